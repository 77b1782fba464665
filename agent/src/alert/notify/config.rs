//! `[[alert_channels]]`: where alert notifications go.
//!
//! One flat table per channel, `kind` saying which keys apply; a key that
//! does not apply to the kind is refused rather than ignored (a `secret_file`
//! on a Slack channel is a mistake the operator should hear about). Every
//! secret comes from a file, read when the channel is built, never logged.
//! Errors name the channel and the key.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

/// PagerDuty's Events API v2 endpoint.
pub const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// Which receiver a channel talks to.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// Alertmanager's v2 API (`POST {url}/api/v2/alerts`).
    #[default]
    Alertmanager,
    /// Any HTTP endpoint: JSON, signed with HMAC-SHA256.
    Webhook,
    /// A Slack incoming webhook.
    Slack,
    /// PagerDuty Events API v2.
    Pagerduty,
    /// Mail over SMTP.
    Smtp,
}

impl ChannelKind {
    /// The name in the config.
    pub fn name(self) -> &'static str {
        match self {
            ChannelKind::Alertmanager => "alertmanager",
            ChannelKind::Webhook => "webhook",
            ChannelKind::Slack => "slack",
            ChannelKind::Pagerduty => "pagerduty",
            ChannelKind::Smtp => "smtp",
        }
    }
}

/// How an SMTP channel protects the connection.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS; a server that does not offer it is refused.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only to a loopback host.
    None,
}

/// One `[[alert_channels]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelConfig {
    /// The channel's name: unique, the key its outbox queue is kept under.
    pub name: String,
    /// The receiver's kind.
    pub kind: ChannelKind,
    /// alertmanager: its base URL; webhook: the URL posted to; pagerduty: the
    /// Events API URL (default [`PAGERDUTY_URL`]).
    pub url: String,
    /// alertmanager: a file holding a bearer token.
    pub bearer_token_file: Option<PathBuf>,
    /// webhook: a file holding the HMAC-SHA256 key.
    pub secret_file: Option<PathBuf>,
    /// webhook, alertmanager: extra request headers.
    pub headers: BTreeMap<String, String>,
    /// slack: a file holding the incoming webhook's URL (a secret).
    pub webhook_url_file: Option<PathBuf>,
    /// pagerduty: a file holding the integration's routing key.
    pub routing_key_file: Option<PathBuf>,
    /// smtp: the server.
    pub host: String,
    /// smtp: its port (0: 587 for starttls, 465 for tls, 25 for none).
    pub port: u16,
    /// smtp: `starttls` (default), `tls` or `none` (loopback only).
    pub tls: SmtpTls,
    /// smtp: the login; empty: no authentication.
    pub username: String,
    /// smtp: a file holding the password.
    pub password_file: Option<PathBuf>,
    /// smtp, and https URLs of the other kinds: a PEM file of CAs to trust
    /// instead of the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// smtp: the sender address.
    pub from: String,
    /// smtp: the recipients.
    pub to: Vec<String>,
    /// How long one delivery attempt may take.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub timeout: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: ChannelKind::default(),
            url: String::new(),
            bearer_token_file: None,
            secret_file: None,
            headers: BTreeMap::new(),
            webhook_url_file: None,
            routing_key_file: None,
            host: String::new(),
            port: 0,
            tls: SmtpTls::default(),
            username: String::new(),
            password_file: None,
            ca_file: None,
            from: String::new(),
            to: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

impl ChannelConfig {
    /// The SMTP port in effect.
    pub fn smtp_port(&self) -> u16 {
        match (self.port, self.tls) {
            (0, SmtpTls::Starttls) => 587,
            (0, SmtpTls::Tls) => 465,
            (0, SmtpTls::None) => 25,
            (p, _) => p,
        }
    }

    /// The PagerDuty URL in effect.
    pub fn pagerduty_url(&self) -> &str {
        if self.url.is_empty() {
            PAGERDUTY_URL
        } else {
            &self.url
        }
    }
}

/// Checks every channel: unique non-empty names, the keys each kind needs
/// and only those. The message names the channel and the key.
pub fn validate(channels: &[ChannelConfig]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for (i, c) in channels.iter().enumerate() {
        if c.name.is_empty() {
            return Err(format!("[[alert_channels]] #{}: name is empty", i + 1));
        }
        if !c
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
            || c.name.len() > 64
        {
            return Err(format!(
                "alert channel {:?}: name must be 1..64 of [A-Za-z0-9._-]",
                c.name
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err(format!("alert channel {:?}: name is used twice", c.name));
        }
        validate_one(c)
            .map_err(|m| format!("alert channel {:?} (kind {}): {m}", c.name, c.kind.name()))?;
    }
    Ok(())
}

fn validate_one(c: &ChannelConfig) -> Result<(), String> {
    use ChannelKind::*;
    if c.timeout.is_zero() || c.timeout > Duration::from_secs(300) {
        return Err(format!(
            "timeout = {:?} must be between 1ns and 5m",
            c.timeout
        ));
    }
    // Which keys each kind takes; any other key set is a mistake.
    let set: [(&str, bool, &[ChannelKind]); 14] = [
        (
            "url",
            !c.url.is_empty(),
            &[Alertmanager, Webhook, Pagerduty],
        ),
        (
            "bearer_token_file",
            c.bearer_token_file.is_some(),
            &[Alertmanager],
        ),
        ("secret_file", c.secret_file.is_some(), &[Webhook]),
        ("headers", !c.headers.is_empty(), &[Alertmanager, Webhook]),
        ("webhook_url_file", c.webhook_url_file.is_some(), &[Slack]),
        (
            "routing_key_file",
            c.routing_key_file.is_some(),
            &[Pagerduty],
        ),
        ("host", !c.host.is_empty(), &[Smtp]),
        ("port", c.port != 0, &[Smtp]),
        ("tls", c.tls != SmtpTls::default(), &[Smtp]),
        ("username", !c.username.is_empty(), &[Smtp]),
        ("password_file", c.password_file.is_some(), &[Smtp]),
        ("from", !c.from.is_empty(), &[Smtp]),
        ("to", !c.to.is_empty(), &[Smtp]),
        (
            "ca_file",
            c.ca_file.is_some(),
            &[Alertmanager, Webhook, Pagerduty, Smtp],
        ),
    ];
    for (key, present, kinds) in set {
        if present && !kinds.contains(&c.kind) {
            return Err(format!("key {key} does not apply to this kind"));
        }
    }
    let need = |key: &str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(format!("key {key} is required"))
        }
    };
    let http_url = |key: &str, url: &str| {
        if url.starts_with("http://") || url.starts_with("https://") {
            Ok(())
        } else {
            Err(format!(
                "key {key} = {url:?} must be an http:// or https:// URL"
            ))
        }
    };
    match c.kind {
        Alertmanager => http_url("url", &c.url)?,
        Webhook => {
            http_url("url", &c.url)?;
            need("secret_file", c.secret_file.is_some())?;
        }
        Slack => need("webhook_url_file", c.webhook_url_file.is_some())?,
        Pagerduty => {
            need("routing_key_file", c.routing_key_file.is_some())?;
            http_url("url", c.pagerduty_url())?;
        }
        Smtp => {
            need("host", !c.host.is_empty())?;
            need("from", !c.from.is_empty())?;
            need("to", !c.to.is_empty())?;
            if c.username.is_empty() != c.password_file.is_none() {
                return Err("keys username and password_file go together".into());
            }
            if c.tls == SmtpTls::None && !is_loopback(&c.host) {
                return Err(format!(
                    "key tls = \"none\" is allowed only for a loopback host, not {:?}",
                    c.host
                ));
            }
        }
    }
    for (name, value) in &c.headers {
        let bad_name = name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if bad_name || value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(format!("key headers: {name:?} is not a valid header"));
        }
    }
    Ok(())
}

/// `localhost` or a loopback address.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ChannelConfig>, String> {
        #[derive(Deserialize)]
        struct T {
            alert_channels: Vec<ChannelConfig>,
        }
        let t: T = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(&t.alert_channels)?;
        Ok(t.alert_channels)
    }

    #[test]
    fn every_kind_parses_with_its_keys() {
        let c = parse(
            r#"
            [[alert_channels]]
            name = "am"
            kind = "alertmanager"
            url = "http://127.0.0.1:9093"
            [[alert_channels]]
            name = "hook"
            kind = "webhook"
            url = "https://hooks.example/x"
            secret_file = "/etc/secret"
            headers = { X-Team = "billing" }
            [[alert_channels]]
            name = "slack"
            kind = "slack"
            webhook_url_file = "/etc/slack"
            [[alert_channels]]
            name = "pd"
            kind = "pagerduty"
            routing_key_file = "/etc/pd"
            [[alert_channels]]
            name = "mail"
            kind = "smtp"
            host = "smtp.example"
            from = "agent@example"
            to = ["ops@example"]
            "#,
        )
        .unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c[3].pagerduty_url(), PAGERDUTY_URL);
        assert_eq!(c[4].smtp_port(), 587);
        assert_eq!(c[4].tls, SmtpTls::Starttls);
    }

    #[test]
    fn errors_name_the_channel_and_the_key() {
        let e = parse(
            "[[alert_channels]]\nname = \"s\"\nkind = \"slack\"\nwebhook_url_file = \"/x\"\nsecret_file = \"/y\"\n",
        )
        .unwrap_err();
        assert!(e.contains("\"s\"") && e.contains("secret_file"), "{e}");
        let e = parse("[[alert_channels]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://x\"\n")
            .unwrap_err();
        assert!(
            e.contains("\"w\"") && e.contains("secret_file is required"),
            "{e}"
        );
        let e = parse(
            "[[alert_channels]]\nname = \"m\"\nkind = \"smtp\"\nhost = \"mail.example\"\ntls = \"none\"\nfrom = \"a@b\"\nto = [\"c@d\"]\n",
        )
        .unwrap_err();
        assert!(e.contains("\"m\"") && e.contains("loopback"), "{e}");
        let e = parse("[[alert_channels]]\nname = \"x\"\nkind = \"alertmanager\"\nurl = \"http://x\"\nbogus = 1\n")
            .unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = parse(
            "[[alert_channels]]\nname = \"a\"\nurl = \"http://x\"\n[[alert_channels]]\nname = \"a\"\nurl = \"http://y\"\n",
        )
        .unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(is_loopback("127.0.0.1") && is_loopback("[::1]") && is_loopback("localhost"));
    }

    /// Through the daemon's own config: the channel's error names the file's problem.
    #[test]
    fn the_daemon_config_takes_and_checks_alert_channels() {
        let c = crate::config::Config::parse(
            "[[alert_channels]]\nname = \"am\"\nurl = \"http://127.0.0.1:9093\"\n",
        )
        .unwrap();
        assert_eq!(c.alert_channels.len(), 1);
        assert_eq!(c.alert_channels[0].kind, ChannelKind::Alertmanager);
        let e = crate::config::Config::parse(
            "[[alert_channels]]\nname = \"pd\"\nkind = \"pagerduty\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("\"pd\"") && e.contains("routing_key_file"),
            "{e}"
        );
    }
}
