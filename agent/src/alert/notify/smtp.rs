//! Mail over SMTP (lettre's blocking transport, run in `spawn_blocking`):
//! one mail per batch (one rule's events) to every recipient.
//!
//! `tls = "starttls"` (the default) requires the server to offer STARTTLS
//! and refuses to send in clear otherwise; `tls` wraps the connection from
//! the first byte; `none` is allowed only to a loopback host (validated in
//! `config.rs`). `ca_file` replaces the built-in web roots. A permanent
//! refusal of the message (550–554: mailbox, size, content) dead-letters
//! it; anything else (connection, TLS, authentication, 4xx) is retried, so
//! a misconfiguration delays mail rather than losing it.

use std::fmt::Write;

use lettre::{
    Message, SmtpTransport, Transport,
    message::{Mailbox, header::ContentType},
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, CertificateStore, Tls, TlsParameters},
    },
};

use super::{
    Channel, NotifyError, SendError,
    config::{ChannelConfig, SmtpTls},
};
use crate::alert::{AlertEvent, AlertState};

/// One SMTP channel.
pub(super) struct Smtp {
    transport: SmtpTransport,
    from: Mailbox,
    to: Vec<Mailbox>,
}

impl Smtp {
    pub(super) fn new(c: &ChannelConfig) -> Result<Self, NotifyError> {
        let invalid = |key: &'static str, message: String| NotifyError::Invalid {
            channel: c.name.clone(),
            key,
            message,
        };
        let from: Mailbox = c
            .from
            .parse()
            .map_err(|e| invalid("from", format!("{:?}: {e}", c.from)))?;
        let to =
            c.to.iter()
                .map(|t| t.parse().map_err(|e| invalid("to", format!("{t:?}: {e}"))))
                .collect::<Result<Vec<Mailbox>, _>>()?;
        let tls = match c.tls {
            SmtpTls::None => Tls::None,
            mode => {
                let mut params = TlsParameters::builder(c.host.clone());
                if let Some(ca) = &c.ca_file {
                    let pem = std::fs::read(ca).map_err(|source| NotifyError::File {
                        channel: c.name.clone(),
                        key: "ca_file",
                        path: ca.clone(),
                        source,
                    })?;
                    let cert = Certificate::from_pem(&pem)
                        .map_err(|e| invalid("ca_file", format!("{}: {e}", ca.display())))?;
                    params = params
                        .certificate_store(CertificateStore::None)
                        .add_root_certificate(cert);
                }
                let params = params
                    .build_rustls()
                    .map_err(|e| invalid("tls", e.to_string()))?;
                if mode == SmtpTls::Tls {
                    Tls::Wrapper(params)
                } else {
                    Tls::Required(params)
                }
            }
        };
        let mut builder = SmtpTransport::builder_dangerous(c.host.clone())
            .port(c.smtp_port())
            .tls(tls)
            .timeout(Some(c.timeout));
        if let Some(path) = &c.password_file {
            let password = super::http::read_secret(&c.name, "password_file", path)?;
            builder = builder.credentials(Credentials::new(c.username.clone(), password));
        }
        Ok(Self {
            transport: builder.build(),
            from,
            to,
        })
    }
}

/// The subject of a mail for `batch` (one rule's events).
pub(super) fn subject(batch: &[AlertEvent]) -> String {
    let firing = batch
        .iter()
        .filter(|e| e.state == AlertState::Firing)
        .count();
    let resolved = batch.len() - firing;
    let mut s = match (firing, resolved) {
        (_, 0) => format!("[FIRING:{firing}]"),
        (0, _) => format!("[RESOLVED:{resolved}]"),
        _ => format!("[FIRING:{firing}, RESOLVED:{resolved}]"),
    };
    if let Some(e) = batch.first() {
        let _ = write!(s, " {}", e.rule);
        if batch.len() == 1
            && let Some(summary) = e.annotations.get("summary")
        {
            let _ = write!(s, ": {summary}");
        }
    }
    // A header line; the template may have put anything in the summary.
    s.replace(['\r', '\n'], " ")
}

/// The plain-text body for `batch`.
pub(super) fn body(batch: &[AlertEvent]) -> String {
    let mut out = String::new();
    for e in batch {
        let state = if e.state == AlertState::Resolved {
            "RESOLVED"
        } else {
            "FIRING"
        };
        let _ = writeln!(out, "[{state}] {} ({})", e.rule, e.kind);
        let _ = writeln!(out, "  value: {}  threshold: {}", e.value, e.threshold);
        let _ = writeln!(out, "  since: {}", e.starts_at);
        if let Some(end) = &e.ends_at {
            let _ = writeln!(out, "  resolved: {end}");
        }
        for (k, v) in &e.annotations {
            let _ = writeln!(out, "  {k}: {v}");
        }
        for (k, v) in &e.labels {
            let _ = writeln!(out, "  label {k}={v}");
        }
        let _ = writeln!(out, "  fingerprint: {}  node: {}", e.fingerprint, e.node);
        out.push('\n');
    }
    out
}

impl Channel for Smtp {
    fn max_batch(&self) -> usize {
        50
    }

    fn send(&self, batch: &[AlertEvent]) -> Result<(), SendError> {
        let mut m = Message::builder()
            .from(self.from.clone())
            .subject(subject(batch))
            .header(ContentType::TEXT_PLAIN);
        for t in &self.to {
            m = m.to(t.clone());
        }
        let message = m
            .body(body(batch))
            .map_err(|e| SendError::Reject(format!("building the mail: {e}")))?;
        match self.transport.send(&message) {
            Ok(_) => Ok(()),
            Err(e) => {
                let code = e.status().map(|c| c.to_string());
                let refused = e.is_permanent()
                    && code
                        .as_deref()
                        .is_some_and(|c| matches!(c, "550" | "551" | "552" | "553" | "554"));
                let message = format!("SMTP: {e}");
                if refused {
                    Err(SendError::Reject(message))
                } else {
                    Err(SendError::Retry(message))
                }
            }
        }
    }
}
