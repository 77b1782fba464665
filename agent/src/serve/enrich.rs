//! Span cost enrichment for the OTLP forwarder: each forwarded span gets the
//! cost of what its process used while it ran, read from the ledger.
//!
//! In: a trace request on its way upstream and the host pid the receiver
//! bound each resource to. Out: the same request with `mentat.cost.*`
//! attributes on the spans of bound processes. Reads only committed windows,
//! on its own read-only connection, so it never waits for a commit.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tracing::warn;

use crate::{ledger::Ledger, serve::forward::Enricher};

/// Adds to each forwarded span the cost of what its process used while it
/// ran (from the ledger): `mentat.cost.total`, `mentat.cost.currency`,
/// `mentat.pricing.version` and `mentat.usage.cpu.time`. The process is the
/// host pid the receiver bound the span's resource to (never a pid as the
/// client claimed it: that may be another tenant's, or a container's
/// namespace pid); spans bound to none go upstream unchanged. One ledger
/// query per bound process per request, on the enricher's own read-only connection.
pub fn cost_enricher(ledger_path: PathBuf) -> Enricher {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    /// Usage windows around a span that can overlap it: a window is one tick.
    const MARGIN_NS: i64 = 60_000_000_000;
    // Its own read-only connection, opened at first use: a query here never
    // holds, nor waits for, the lock the window commits take.
    let reader: Mutex<Option<Ledger>> = Mutex::new(None);
    Arc::new(move |req, host_pids| {
        let ns = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        // Each bound process's span range over the whole request.
        let mut ranges: HashMap<u32, (i64, i64)> = HashMap::new();
        for (rs, pid) in req.resource_spans.iter().zip(host_pids) {
            let Some(pid) = pid else { continue };
            for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                let (start, end) = (ns(span.start_time_unix_nano), ns(span.end_time_unix_nano));
                let r = ranges.entry(*pid).or_insert((start, end));
                r.0 = r.0.min(start);
                r.1 = r.1.max(end);
            }
        }
        let mut records = HashMap::new();
        for (pid, (start, end)) in ranges {
            let query = crate::ledger::RecordQuery {
                from: crate::probes::clock::rfc3339_of_ns(start.saturating_sub(MARGIN_NS)),
                to: crate::probes::clock::rfc3339_of_ns(end.saturating_add(MARGIN_NS)),
                filters: vec![("pid".into(), pid.to_string())],
                after: None,
                limit: 10_000,
            };
            let Ok(mut reader) = reader.lock() else {
                return;
            };
            if reader.is_none() {
                match Ledger::open_read_only(&ledger_path) {
                    Ok(l) => *reader = Some(l),
                    Err(e) => {
                        warn!(error = %e, "span cost enrichment: the ledger cannot be read; spans go upstream as received");
                        return;
                    }
                }
            }
            let Some(l) = reader.as_ref() else { return };
            let page = l.records(&query);
            if let Ok(page) = page {
                records.insert(pid, page.records);
            }
        }
        for (rs, pid) in req.resource_spans.iter_mut().zip(host_pids) {
            let Some(pid) = pid else { continue };
            let Some(records) = records.get(pid) else {
                continue;
            };
            let Some(priced) = records.iter().find_map(|r| r.cost.as_ref()) else {
                continue;
            };
            for span in rs.scope_spans.iter_mut().flat_map(|ss| &mut ss.spans) {
                let (start, end) = (ns(span.start_time_unix_nano), ns(span.end_time_unix_nano));
                let (cost, cpu) = crate::report::record::usage_during(records, *pid, start, end);
                let kv = |k: &str, v: Value| KeyValue {
                    key: k.into(),
                    value: Some(AnyValue { value: Some(v) }),
                    ..Default::default()
                };
                use rust_decimal::prelude::ToPrimitive;
                span.attributes.extend([
                    kv(
                        "mentat.cost.total",
                        Value::DoubleValue(cost.to_f64().unwrap_or(0.0)),
                    ),
                    kv(
                        "mentat.cost.currency",
                        Value::StringValue(priced.currency.clone()),
                    ),
                    kv(
                        "mentat.pricing.version",
                        Value::StringValue(priced.pricing_version.clone()),
                    ),
                    kv(
                        "mentat.usage.cpu.time",
                        Value::DoubleValue(cpu.to_f64().unwrap_or(0.0)),
                    ),
                ]);
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, KeyValue, any_value::Value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan},
    };
    use rust_decimal::Decimal;

    use std::time::Duration;

    use super::*;
    use crate::report::record::{Cost, UsageRecord};

    /// One resource claiming `claimed` as its process.pid, one span over [start, end].
    fn resource(claimed: i64, start: u64, end: u64) -> ResourceSpans {
        ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "process.pid".into(),
                    value: Some(AnyValue {
                        value: Some(Value::IntValue(claimed)),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![OtlpSpan {
                    trace_id: vec![1; 16],
                    span_id: vec![1; 8],
                    start_time_unix_nano: start,
                    end_time_unix_nano: end,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn cost_of(rs: &ResourceSpans) -> Option<f64> {
        rs.scope_spans[0].spans[0]
            .attributes
            .iter()
            .find(|kv| kv.key == "mentat.cost.total")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::DoubleValue(d) => Some(*d),
                _ => None,
            })
    }

    #[test]
    fn cost_enrichment_looks_up_the_bound_pid_never_the_claimed_one_and_saturates() {
        let dir = std::env::temp_dir().join(format!("enrich-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ledger = Ledger::open(&dir.join("l.db"), Duration::from_secs(3600)).unwrap();
        // One window of pid 4242 costing 1 USD; t0 is a whole second.
        let t0: u64 = 1_800_000_000_000_000_000;
        let (ws, we) = (
            crate::probes::clock::rfc3339_of_ns(t0 as i64),
            crate::probes::clock::rfc3339_of_ns((t0 + 1_000_000_000) as i64),
        );
        let record = UsageRecord {
            record_id: "r1".into(),
            node: "n".into(),
            window_start: ws.clone(),
            window_end: we.clone(),
            record_kind: "process".into(),
            pid: Some(4242),
            cost: Some(Cost {
                total: Decimal::ONE,
                subtotal: Decimal::ONE,
                currency: "USD".into(),
                pricing_version: "v".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        ledger.commit_window(&ws, &we, &[record], &[]).unwrap();
        let enrich = cost_enricher(dir.join("l.db"));
        let mut req = ExportTraceServiceRequest {
            resource_spans: vec![
                // Claims pid 1, bound by the sender check to 4242: 4242's cost.
                resource(1, t0, t0 + 1_000_000_000),
                // Claims 4242, bound to no host pid (a namespace pid): nothing.
                resource(4242, t0, t0 + 1_000_000_000),
                // An end past i64: no overflow, and the whole window.
                resource(4242, t0, u64::MAX),
            ],
        };
        enrich(&mut req, &[Some(4242), None, Some(4242)]);
        assert_eq!(cost_of(&req.resource_spans[0]), Some(1.0));
        assert_eq!(cost_of(&req.resource_spans[1]), None);
        assert_eq!(cost_of(&req.resource_spans[2]), Some(1.0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
