//! Slack incoming webhooks: one message per batch (the batch is one rule's
//! events), `text` in Slack's mrkdwn. The webhook URL is the secret: read
//! from `webhook_url_file`, never in a log line or an error message.

use std::fmt::Write;

use super::{Channel, NotifyError, SendError, config::ChannelConfig, http::Http};
use crate::alert::{AlertEvent, AlertState};

/// One Slack channel.
pub(super) struct Slack {
    http: Http,
    url: String,
}

impl Slack {
    pub(super) fn new(c: &ChannelConfig) -> Result<Self, NotifyError> {
        let path = c
            .webhook_url_file
            .as_deref()
            .ok_or_else(|| NotifyError::Invalid {
                channel: c.name.clone(),
                key: "webhook_url_file",
                message: "is required".into(),
            })?;
        let url = super::http::read_secret(&c.name, "webhook_url_file", path)?;
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err(NotifyError::Invalid {
                channel: c.name.clone(),
                key: "webhook_url_file",
                message: format!("{} does not hold an http(s) URL", path.display()),
            });
        }
        Ok(Self {
            http: Http::new(&c.name, None, c.timeout)?.redacting(url.clone()),
            url,
        })
    }
}

/// Escapes what Slack's mrkdwn treats as markup (`&`, `<`, `>`).
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The message text for `batch`.
pub(super) fn text(batch: &[AlertEvent]) -> String {
    let mut out = String::new();
    for e in batch {
        let (mark, state) = match e.state {
            AlertState::Resolved => (":white_check_mark:", "RESOLVED"),
            _ => (":rotating_light:", "FIRING"),
        };
        let _ = write!(out, "{mark} *[{state}] {}*", escape(&e.rule));
        if let Some(s) = e.annotations.get("summary") {
            let _ = write!(out, " — {}", escape(s));
        }
        let _ = write!(
            out,
            "\nvalue {} (threshold {}) since {}",
            escape(&e.value),
            escape(&e.threshold),
            escape(&e.starts_at)
        );
        let labels: Vec<String> = e
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect();
        let _ = writeln!(out, "\n`{}`", labels.join(" "));
    }
    out
}

impl Channel for Slack {
    fn max_batch(&self) -> usize {
        20
    }

    fn send(&self, batch: &[AlertEvent]) -> Result<(), SendError> {
        let body = serde_json::to_vec(&serde_json::json!({ "text": text(batch) }))
            .map_err(|e| SendError::Reject(format!("encoding: {e}")))?;
        self.http.post_json(&self.url, &[], body)
    }
}
