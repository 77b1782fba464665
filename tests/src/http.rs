//! Plain HTTP GETs to loopback servers (the agent's query API, Prometheus's HTTP API).

use std::time::Duration;

use anyhow::{Context, Result};

/// How long one request may take: every server here is on loopback.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A response: status and body, whatever the status.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("HTTP {}: the body is not JSON: {}", self.status, self.body))
    }
}

/// `GET url?query` with an optional bearer token; any status is returned, not an error.
pub fn get(url: &str, query: &[(&str, &str)], bearer: Option<&str>) -> Result<Response> {
    let mut request = ureq::get(url);
    for (k, v) in query {
        request = request.query(*k, *v);
    }
    if let Some(token) = bearer {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .call()
        .with_context(|| format!("GET {url} {query:?}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()
        .with_context(|| format!("reading the body of GET {url} {query:?} (HTTP {status})"))?;
    Ok(Response { status, body })
}
