//! The one OTLP/gRPC client setup, shared by the metrics exporter and the
//! span forwarder: endpoint, TLS with an optional CA bundle, request
//! headers and timeout, all checked at start-up with an error naming what
//! was wrong.

use std::{collections::BTreeMap, path::PathBuf, str::FromStr, time::Duration};

use serde::Deserialize;
use tonic::{
    metadata::{Ascii, MetadataKey, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

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
    /// The per-request (and connect) timeout.
    pub fn timeout(&self) -> Duration {
        if self.timeout_ms == 0 {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(self.timeout_ms)
        }
    }
}

/// Why an OTLP client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The endpoint is not a URI.
    #[error("endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    /// The CA bundle could not be read.
    #[error("CA file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be configured for the endpoint.
    #[error("TLS for {endpoint}: {message}")]
    Tls { endpoint: String, message: String },
    /// A header name or value is not valid in gRPC metadata.
    #[error("header {name:?}: {message}")]
    Header { name: String, message: String },
}

/// A lazily connected channel to an OTLP endpoint, with the headers to add
/// to every request (a receiver that is down now does not fail start-up).
#[derive(Clone, Debug)]
pub struct OtlpChannel {
    /// The endpoint, for logs.
    pub endpoint: String,
    /// The channel (connects on first use).
    pub channel: Channel,
    headers: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
}

impl OtlpChannel {
    /// Checks `config` and sets up its channel.
    pub fn new(config: &OtlpConfig) -> Result<Self, ChannelError> {
        let timeout = config.timeout();
        let mut endpoint = Endpoint::from_str(&config.endpoint)
            .map_err(|e| ChannelError::Endpoint {
                endpoint: config.endpoint.clone(),
                message: e.to_string(),
            })?
            .timeout(timeout)
            .connect_timeout(timeout);
        if config.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &config.ca_file {
                let pem = std::fs::read(ca).map_err(|source| ChannelError::CaFile {
                    path: ca.clone(),
                    source,
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| ChannelError::Tls {
                endpoint: config.endpoint.clone(),
                message: e.to_string(),
            })?;
        }
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| {
                let header = |message: String| ChannelError::Header {
                    name: k.clone(),
                    message,
                };
                let key = MetadataKey::from_str(k).map_err(|e| header(e.to_string()))?;
                let value =
                    MetadataValue::from_str(v).map_err(|e| header(format!("value: {e}")))?;
                Ok((key, value))
            })
            .collect::<Result<_, ChannelError>>()?;
        Ok(Self {
            endpoint: config.endpoint.clone(),
            channel: endpoint.connect_lazy(),
            headers,
        })
    }

    /// `body` as a request carrying the configured headers.
    pub fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut call = tonic::Request::new(body);
        for (k, v) in &self.headers {
            call.metadata_mut().insert(k.clone(), v.clone());
        }
        call
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str) -> OtlpConfig {
        OtlpConfig {
            endpoint: endpoint.into(),
            ..OtlpConfig::default()
        }
    }

    #[tokio::test]
    async fn bad_settings_are_refused_naming_what_was_wrong() {
        let e = OtlpChannel::new(&config("not a uri")).expect_err("bad endpoint");
        assert!(e.to_string().contains("\"not a uri\""), "{e}");
        let e = OtlpChannel::new(&OtlpConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..config("https://collector:4317")
        })
        .expect_err("missing CA");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e = OtlpChannel::new(&OtlpConfig {
            headers: [("bad header\n".to_string(), "v".to_string())].into(),
            ..config("http://collector:4317")
        })
        .expect_err("bad header");
        assert!(e.to_string().contains("bad header"), "{e}");
        let ok = OtlpChannel::new(&OtlpConfig {
            headers: [("x-api-key".to_string(), "k".to_string())].into(),
            timeout_ms: 250,
            ..config("http://collector:4317")
        })
        .expect("valid");
        let call = ok.request(());
        assert_eq!(
            call.metadata()
                .get("x-api-key")
                .and_then(|v| v.to_str().ok()),
            Some("k")
        );
    }
}
