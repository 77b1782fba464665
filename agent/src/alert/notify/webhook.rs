//! A generic webhook: the events as JSON, signed.
//!
//! Body: `{"version": "1", "channel": NAME, "sent_at": UNIX_SECONDS,
//! "alerts": [AlertEvent, ...]}`. Headers: `X-Mentat-Signature:
//! sha256=<hex HMAC-SHA256 of the exact body with the secret>` and
//! `X-Mentat-Timestamp: UNIX_SECONDS`, the same number as `sent_at`. Since
//! the time is inside the signed body, a receiver that checks the signature,
//! that the header equals `sent_at` and that it is recent (e.g. within 5
//! minutes) refuses a replayed request; `(fingerprint, state, starts_at,
//! repeat)` identifies an event for deduplication (delivery is at least
//! once: a request acknowledged but not yet marked sent when the agent died
//! is sent again).

use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;
use serde::Serialize;

use super::{Channel, NotifyError, SendError, config::ChannelConfig, http::Http};
use crate::alert::AlertEvent;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Mentat-Signature";
/// The timestamp header (Unix seconds, also the body's `sent_at`).
pub const TIMESTAMP_HEADER: &str = "X-Mentat-Timestamp";

/// One webhook channel.
pub(super) struct Webhook {
    http: Http,
    name: String,
    url: String,
    key: hmac::Key,
    headers: Vec<(String, String)>,
}

#[derive(Serialize)]
struct Body<'a> {
    version: &'static str,
    channel: &'a str,
    sent_at: u64,
    alerts: &'a [AlertEvent],
}

impl Webhook {
    pub(super) fn new(c: &ChannelConfig) -> Result<Self, NotifyError> {
        let path = c
            .secret_file
            .as_deref()
            .ok_or_else(|| NotifyError::Invalid {
                channel: c.name.clone(),
                key: "secret_file",
                message: "is required".into(),
            })?;
        let secret = super::http::read_secret(&c.name, "secret_file", path)?;
        Ok(Self {
            http: Http::new(&c.name, c.ca_file.as_deref(), c.timeout)?,
            name: c.name.clone(),
            url: c.url.clone(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
            headers: c
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

/// `sha256=<hex>` of `body` under `key`.
pub(super) fn signature(key: &hmac::Key, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac::sign(key, body).as_ref()))
}

impl Channel for Webhook {
    fn max_batch(&self) -> usize {
        64
    }

    fn send(&self, batch: &[AlertEvent]) -> Result<(), SendError> {
        let sent_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let body = serde_json::to_vec(&Body {
            version: "1",
            channel: &self.name,
            sent_at,
            alerts: batch,
        })
        .map_err(|e| SendError::Reject(format!("encoding: {e}")))?;
        let mut headers = self.headers.clone();
        headers.push((SIGNATURE_HEADER.into(), signature(&self.key, &body)));
        headers.push((TIMESTAMP_HEADER.into(), sent_at.to_string()));
        self.http.post_json(&self.url, &headers, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2: the signature is standard HMAC-SHA256, so any
    /// receiver's library checks it.
    #[test]
    fn signature_is_rfc4231_hmac_sha256() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
