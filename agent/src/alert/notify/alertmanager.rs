//! Alertmanager v2: `POST {url}/api/v2/alerts` with a list of alerts, so
//! operators keep their routing, silences and receivers.
//!
//! A firing alert's `endsAt` is the event's `valid_until`: Alertmanager
//! resolves an alert on its own once `endsAt` passes, and the rules engine
//! repeats a firing alert before then, so it stays firing while the agent
//! is up and resolves by itself if the agent goes away. A resolved alert's
//! `endsAt` is when it resolved. Label names Alertmanager would refuse
//! (outside `[A-Za-z_][A-Za-z0-9_]*`) are rewritten with `_`; empty values
//! are left out (Alertmanager treats them as absent).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Channel, NotifyError, SendError, config::ChannelConfig, http::Http};
use crate::alert::{AlertEvent, AlertState};

/// One channel to an Alertmanager.
pub(super) struct Alertmanager {
    http: Http,
    url: String,
    headers: Vec<(String, String)>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PostableAlert<'a> {
    labels: BTreeMap<String, &'a str>,
    annotations: BTreeMap<&'a str, &'a str>,
    starts_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ends_at: Option<&'a str>,
}

impl Alertmanager {
    pub(super) fn new(c: &ChannelConfig) -> Result<Self, NotifyError> {
        let mut headers: Vec<(String, String)> = c
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut http = Http::new(&c.name, c.ca_file.as_deref(), c.timeout)?;
        if let Some(path) = &c.bearer_token_file {
            let token = super::http::read_secret(&c.name, "bearer_token_file", path)?;
            headers.push(("Authorization".into(), format!("Bearer {token}")));
            http = http.redacting(token);
        }
        Ok(Self {
            http,
            url: format!("{}/api/v2/alerts", c.url.trim_end_matches('/')),
            headers,
        })
    }
}

/// A label name Alertmanager accepts.
fn label_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The alerts of `batch` as Alertmanager's API takes them.
pub(super) fn body(batch: &[AlertEvent]) -> Result<Vec<u8>, SendError> {
    let alerts: Vec<PostableAlert<'_>> = batch
        .iter()
        .map(|e| {
            let mut labels: BTreeMap<String, &str> = e
                .labels
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (label_name(k), v.as_str()))
                .collect();
            labels.entry("alertname".into()).or_insert(e.rule.as_str());
            let ends_at = match e.state {
                AlertState::Resolved => Some(e.ends_at.as_deref().unwrap_or(e.at.as_str())),
                _ => e.valid_until.as_deref(),
            };
            PostableAlert {
                labels,
                annotations: e
                    .annotations
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
                starts_at: &e.starts_at,
                ends_at,
            }
        })
        .collect();
    serde_json::to_vec(&alerts).map_err(|e| SendError::Reject(format!("encoding: {e}")))
}

impl Channel for Alertmanager {
    fn max_batch(&self) -> usize {
        64
    }

    fn send(&self, batch: &[AlertEvent]) -> Result<(), SendError> {
        self.http.post_json(&self.url, &self.headers, body(batch)?)
    }
}
