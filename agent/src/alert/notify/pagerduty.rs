//! PagerDuty Events API v2: a `trigger` for a firing alert, a `resolve` for
//! a resolved one, both with `dedup_key` = the alert's fingerprint, so a
//! repeat or a re-send after a restart updates the same incident and the
//! resolve closes it. The API takes one event per request (batch of one).

use serde_json::json;

use super::{Channel, NotifyError, SendError, config::ChannelConfig, http::Http};
use crate::alert::{AlertEvent, AlertState};

/// PagerDuty's limit on `payload.summary`.
const SUMMARY_MAX: usize = 1024;

/// One PagerDuty channel (one integration's routing key).
pub(super) struct PagerDuty {
    http: Http,
    url: String,
    routing_key: String,
}

impl PagerDuty {
    pub(super) fn new(c: &ChannelConfig) -> Result<Self, NotifyError> {
        let path = c
            .routing_key_file
            .as_deref()
            .ok_or_else(|| NotifyError::Invalid {
                channel: c.name.clone(),
                key: "routing_key_file",
                message: "is required".into(),
            })?;
        let routing_key = super::http::read_secret(&c.name, "routing_key_file", path)?;
        Ok(Self {
            http: Http::new(&c.name, c.ca_file.as_deref(), c.timeout)?
                .redacting(routing_key.clone()),
            url: c.pagerduty_url().to_string(),
            routing_key,
        })
    }
}

/// PagerDuty's severity for the alert's `severity` label (default `warning`).
fn severity(e: &AlertEvent) -> &'static str {
    match e
        .labels
        .get("severity")
        .map(|s| s.to_ascii_lowercase())
        .as_deref()
    {
        Some("critical" | "page") => "critical",
        Some("error") => "error",
        Some("info" | "none") => "info",
        _ => "warning",
    }
}

/// The Events API v2 body for `e`.
pub(super) fn event(routing_key: &str, e: &AlertEvent) -> serde_json::Value {
    match e.state {
        AlertState::Resolved => json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": e.fingerprint,
        }),
        _ => {
            let mut summary = format!("[FIRING] {}", e.rule);
            if let Some(s) = e.annotations.get("summary") {
                summary.push_str(": ");
                summary.push_str(s);
            }
            if summary.len() > SUMMARY_MAX {
                let mut cut = SUMMARY_MAX;
                while !summary.is_char_boundary(cut) {
                    cut -= 1;
                }
                summary.truncate(cut);
            }
            json!({
                "routing_key": routing_key,
                "event_action": "trigger",
                "dedup_key": e.fingerprint,
                "payload": {
                    "summary": summary,
                    "source": e.node,
                    "severity": severity(e),
                    "timestamp": e.starts_at,
                    "component": e.kind,
                    "custom_details": {
                        "value": e.value,
                        "threshold": e.threshold,
                        "labels": e.labels,
                        "annotations": e.annotations,
                        "repeat": e.repeat,
                    },
                },
            })
        }
    }
}

impl Channel for PagerDuty {
    fn max_batch(&self) -> usize {
        1
    }

    fn send(&self, batch: &[AlertEvent]) -> Result<(), SendError> {
        for e in batch {
            let body = serde_json::to_vec(&event(&self.routing_key, e))
                .map_err(|e| SendError::Reject(format!("encoding: {e}")))?;
            self.http.post_json(&self.url, &[], body)?;
        }
        Ok(())
    }
}
