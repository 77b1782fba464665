//! HTTP for the channels that POST JSON (Alertmanager, webhook, Slack,
//! PagerDuty): one blocking `ureq` agent per channel (run in
//! `spawn_blocking`), and the rule that sorts a response into sent, retry
//! and refused.
//!
//! 2xx: sent. 408, 429, 5xx, 3xx (redirects are not followed: a POST must not
//! turn into a GET) and transport errors: retried with backoff. Any other
//! 4xx: the receiver refused this payload and will refuse it again, so it is
//! dead-lettered. Messages never carry the secret in `redact` (a Slack URL).

use std::{fs, path::Path, time::Duration};

use super::{NotifyError, SendError};

/// Bytes of a response body kept for the error message.
const ERROR_BODY_BYTES: u64 = 512;

/// A channel's HTTP client.
pub(super) struct Http {
    agent: ureq::Agent,
    redact: Option<String>,
}

impl Http {
    /// A client trusting `ca_file` (else the built-in web roots), with `timeout` per request.
    pub(super) fn new(
        channel: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, NotifyError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = ca_file {
            let pem = fs::read(ca).map_err(|source| NotifyError::File {
                channel: channel.to_string(),
                key: "ca_file",
                path: ca.to_path_buf(),
                source,
            })?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(NotifyError::Invalid {
                    channel: channel.to_string(),
                    key: "ca_file",
                    message: format!("{} holds no PEM certificate", ca.display()),
                });
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Self {
            agent,
            redact: None,
        })
    }

    /// Keeps `secret` out of every message.
    pub(super) fn redacting(mut self, secret: String) -> Self {
        self.redact = Some(secret);
        self
    }

    /// POSTs `body` as JSON with `headers`, and sorts the outcome.
    pub(super) fn post_json(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<(), SendError> {
        let mut req = self
            .agent
            .post(url)
            .header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let mut resp = req
            .send(body)
            .map_err(|e| SendError::Retry(self.clean(format!("POST failed: {e}"))))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(ERROR_BODY_BYTES)
            .read_to_vec()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let message = self.clean(format!("HTTP {status}: {}", text.trim()));
        if status == 408 || status == 429 || !(400..500).contains(&status) {
            Err(SendError::Retry(message))
        } else {
            Err(SendError::Reject(message))
        }
    }

    fn clean(&self, message: String) -> String {
        match &self.redact {
            Some(s) if !s.is_empty() => message.replace(s.as_str(), "<redacted>"),
            _ => message,
        }
    }
}

/// Reads a secret from `path` (trimmed), naming the channel and key on failure.
pub(super) fn read_secret(
    channel: &str,
    key: &'static str,
    path: &Path,
) -> Result<String, NotifyError> {
    let text = fs::read_to_string(path).map_err(|source| NotifyError::File {
        channel: channel.to_string(),
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(NotifyError::Invalid {
            channel: channel.to_string(),
            key,
            message: format!("{} is empty", path.display()),
        });
    }
    Ok(secret)
}
