//! Alert rules: `[[alerts]]` in the daemon's config or in `[alerting]
//! rules_file`, parsed, checked and compiled into [`Rule`]s.
//!
//! In: TOML text and where it came from. Out: compiled rules, or one error
//! naming `file:line`, the rule and what is wrong. Every check that can be
//! made without the ledger is made here, so a rule that loads can always be
//! evaluated: unknown fields, measures, groups, operators, placeholders in
//! templates, a float where money is meant (thresholds are exact decimals:
//! `value = "5"` or `value = 5`, never `5.0`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};

use crate::ledger::{FIELDS, Totals, models::MODEL};

/// Why rules were refused: where, which rule, what.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The rules file could not be read.
    #[error("reading alert rules {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The text is not valid TOML or a rule has a key or type it cannot take.
    #[error("{origin}:{line}: {message}")]
    Syntax {
        /// The file (or "config").
        origin: String,
        /// 1-based line.
        line: usize,
        /// toml's description.
        message: String,
    },
    /// A rule is well-formed TOML but not a valid rule.
    #[error("{origin}:{line}: alert rule {rule:?}: {message}")]
    Invalid {
        /// The file.
        origin: String,
        /// 1-based line of the rule's `[[alerts]]` table.
        line: usize,
        /// The rule's name.
        rule: String,
        /// What is wrong.
        message: String,
    },
}

/// A decimal amount in a rule: a TOML string or integer, never a float
/// (a float is not the exact number the operator wrote).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amount(pub Decimal);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
            Float(f64),
        }
        match Raw::deserialize(d)? {
            Raw::Int(i) => Ok(Amount(Decimal::from(i))),
            Raw::Text(s) => Decimal::from_str_exact(s.trim())
                .map(Amount)
                .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a decimal: {e}"))),
            Raw::Float(f) => Err(serde::de::Error::custom(format!(
                "{f} is a float; write amounts as strings (\"{f}\") so they are exact"
            ))),
        }
    }
}

/// One `[[alerts]]` table as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name (the `alertname` label).
    pub name: String,
    /// `threshold`, `budget`, `anomaly` or `waste`.
    pub kind: String,
    /// `field = value` filters, as `/v1/usage`'s `where`.
    #[serde(rename = "where")]
    pub filters: BTreeMap<String, String>,
    /// run, flow, agent, customer, project, container or model.
    pub group: String,
    /// A summed column of the ledger (see [`MEASURES`]).
    pub measure: String,
    /// How far back the measure sums ("5m"), or "lifetime" (since the group began, within `lookback`).
    pub window: String,
    /// `total`, `per_second` or `per_hour` (the total divided by the window).
    #[serde(rename = "as")]
    pub aggregate: String,
    /// `>`, `>=`, `<`, `<=`, `==`, `!=`.
    pub op: String,
    /// The threshold (threshold: the measure; waste: GB of GPU memory held; anomaly: unused).
    pub value: Option<Amount>,
    /// How long the condition must hold before the alert fires ("0s": at once).
    #[serde(rename = "for")]
    pub for_: String,
    /// Labels added to the alert.
    pub labels: BTreeMap<String, String>,
    /// Annotations, with `{{ group }}`, `{{ value }}`, `{{ threshold }}`, `{{ rule }}` and label names.
    pub annotations: BTreeMap<String, String>,
    /// Alert channel names (empty: every channel).
    pub channels: Vec<String>,
    /// budget: the amount for the month.
    pub budget: Option<Amount>,
    /// budget: the percentages of it that fire, each an alert of its own.
    pub percents: Vec<u32>,
    /// anomaly: runs of the same flow needed before a z-score counts.
    pub min_history: usize,
    /// anomaly: the robust z-score at or above which a run is anomalous.
    pub z: Option<Amount>,
    /// anomaly and lifetime windows: how far back history is read.
    pub lookback: String,
    /// lifetime windows and anomaly: a group with no record for this long is over (its alert resolves).
    pub idle: String,
    /// waste: the GPU counts as idle below this busy fraction of the window.
    pub max_gpu_busy: Option<Amount>,
}

impl Default for RuleConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: "threshold".into(),
            filters: BTreeMap::new(),
            group: String::new(),
            measure: "cost_total".into(),
            window: "5m".into(),
            aggregate: "total".into(),
            op: ">".into(),
            value: None,
            for_: "0s".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            channels: Vec::new(),
            budget: None,
            percents: vec![50, 80, 100],
            min_history: 10,
            z: None,
            lookback: "24h".into(),
            idle: "5m".into(),
            max_gpu_busy: None,
        }
    }
}

/// What a rule decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// measure op value.
    Threshold,
    /// month-to-date spend vs a budget.
    Budget,
    /// a run's cost vs its flow's recent runs.
    Anomaly,
    /// GPU memory held while the GPU is idle.
    Waste,
}

impl Kind {
    /// The name in rules and events.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Threshold => "threshold",
            Kind::Budget => "budget",
            Kind::Anomaly => "anomaly",
            Kind::Waste => "waste",
        }
    }
}

/// How far back a measure sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last so long before the evaluated window's end.
    Last(Duration),
    /// Since the group began (within `lookback`); over once idle.
    Lifetime,
}

/// Total, or the total divided by the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregate {
    /// The sum.
    Total,
    /// Sum / window seconds.
    PerSecond,
    /// Sum / window hours.
    PerHour,
}

/// A comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Op {
    /// Whether `a op b` holds (exact decimals).
    pub fn holds(self, a: Decimal, b: Decimal) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }

    /// As written.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

/// Groups a rule may name, and the ledger field each stands for.
pub const GROUPS: [(&str, &str); 7] = [
    ("run", "run_id"),
    ("flow", "flow_id"),
    ("agent", "agent_id"),
    ("customer", "customer_id"),
    ("project", "project_id"),
    ("container", "container_id"),
    ("model", MODEL),
];

/// The measures: every column the ledger sums, and `records`.
pub const MEASURES: [&str; 25] = [
    "cost_total",
    "cost_cpu",
    "cost_memory",
    "cost_gpu",
    "cost_network",
    "cost_storage",
    "cost_token",
    "cost_subtotal",
    "cost_discount",
    "cpu_core_seconds",
    "memory_gb_seconds",
    "gpu_seconds",
    "gpu_memory_gb_seconds",
    "gpu_energy_joules",
    "network_rx_bytes",
    "network_tx_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "storage_bytes",
    "syscalls",
    "tokens_input",
    "tokens_cache_read_input",
    "tokens_output",
    "tokens_reasoning_output",
    "records",
];

/// The value of measure `m` (an index into [`MEASURES`]) in `t`.
pub fn measure_of(t: &Totals, m: usize) -> Decimal {
    let c = &t.cost;
    match m {
        0 => c.total,
        1 => c.cpu,
        2 => c.memory,
        3 => c.gpu,
        4 => c.network,
        5 => c.storage,
        6 => c.token,
        7 => c.subtotal,
        8 => c.discount,
        9 => t.cpu_core_seconds,
        10 => t.memory_gb_seconds,
        11 => t.gpu_seconds,
        12 => t.gpu_memory_gb_seconds,
        13 => t.gpu_energy_joules,
        14 => t.network_rx_bytes.into(),
        15 => t.network_tx_bytes.into(),
        16 => t.disk_read_bytes.into(),
        17 => t.disk_write_bytes.into(),
        18 => t.storage_bytes.into(),
        19 => t.syscalls.into(),
        20 => t.tokens_input.into(),
        21 => t.tokens_cache_read_input.into(),
        22 => t.tokens_output.into(),
        23 => t.tokens_reasoning_output.into(),
        _ => t.records.into(),
    }
}

/// Placeholders every template may use, besides label names.
const PLACEHOLDERS: [&str; 4] = ["group", "value", "threshold", "rule"];

/// Placeholders a kind adds: budget `percent` and `forecast` (when spend
/// crosses the budget at its month-to-date rate), anomaly `median` and `z`,
/// waste `gpu_busy` (the fraction of the window the GPU was busy).
fn kind_placeholders(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Threshold => &[],
        Kind::Budget => &["percent", "forecast"],
        Kind::Anomaly => &["median", "z"],
        Kind::Waste => &["gpu_busy"],
    }
}

/// A checked rule, ready to evaluate.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Unique name.
    pub name: String,
    /// What it decides on.
    pub kind: Kind,
    /// `field = value` filters for the ledger.
    pub filters: Vec<(String, String)>,
    /// The ledger field the alert is per (`run_id`, ...).
    pub group_field: &'static str,
    /// Index into [`MEASURES`].
    pub measure: usize,
    /// How far back.
    pub window: Window,
    /// Total or rate.
    pub aggregate: Aggregate,
    /// The comparison.
    pub op: Op,
    /// The threshold (see [`RuleConfig::value`]).
    pub value: Decimal,
    /// How long the condition must hold before firing.
    pub for_: Duration,
    /// Labels added to the alert.
    pub labels: BTreeMap<String, String>,
    /// Annotation templates (checked).
    pub annotations: BTreeMap<String, String>,
    /// Channel names (empty: every channel).
    pub channels: Vec<String>,
    /// budget: the month's amount.
    pub budget: Decimal,
    /// budget: the percentages that fire.
    pub percents: Vec<u32>,
    /// anomaly: history needed.
    pub min_history: usize,
    /// anomaly: z threshold.
    pub z: Decimal,
    /// History read back for lifetime windows and anomaly.
    pub lookback: Duration,
    /// A group idle this long is over.
    pub idle: Duration,
    /// waste: busy fraction below which the GPU is idle.
    pub max_gpu_busy: Decimal,
    /// `file:line` of its table.
    pub origin: String,
}

#[derive(Deserialize)]
struct RulesText {
    #[serde(default)]
    alerts: Vec<toml::Spanned<RuleConfig>>,
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).map_or(1, |t| t.matches('\n').count() + 1)
}

/// Parses and checks the `[[alerts]]` of TOML `text` (other keys are
/// ignored: the config's own parser checks them); `origin` names the file.
pub fn parse_text(text: &str, origin: &str) -> Result<Vec<Rule>, RuleError> {
    let parsed: RulesText = toml::from_str(text).map_err(|e| RuleError::Syntax {
        origin: origin.to_string(),
        line: e.span().map_or(1, |s| line_of(text, s.start)),
        message: e.message().to_string(),
    })?;
    let mut names = BTreeSet::new();
    let mut rules = Vec::new();
    for spanned in parsed.alerts {
        let line = line_of(text, spanned.span().start);
        let raw = spanned.into_inner();
        let invalid = |message: String| RuleError::Invalid {
            origin: origin.to_string(),
            line,
            rule: raw.name.clone(),
            message,
        };
        if !names.insert(raw.name.clone()) {
            return Err(invalid("the name is used by an earlier rule".into()));
        }
        rules.push(compile(&raw, format!("{origin}:{line}")).map_err(invalid)?);
    }
    Ok(rules)
}

/// Reads and checks a rules file.
pub fn load_file(path: &Path) -> Result<Vec<Rule>, RuleError> {
    let text = std::fs::read_to_string(path).map_err(|source| RuleError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_text(&text, &path.display().to_string())
}

/// The rules of the config text and of the rules file together: names unique across both.
pub fn merge(mut a: Vec<Rule>, b: Vec<Rule>) -> Result<Vec<Rule>, RuleError> {
    for r in b {
        if let Some(first) = a.iter().find(|x| x.name == r.name) {
            let (origin, line) = split_origin(&r.origin);
            return Err(RuleError::Invalid {
                origin,
                line,
                rule: r.name.clone(),
                message: format!("the name is used by the rule at {}", first.origin),
            });
        }
        a.push(r);
    }
    Ok(a)
}

fn split_origin(o: &str) -> (String, usize) {
    match o.rsplit_once(':') {
        Some((f, l)) => (f.to_string(), l.parse().unwrap_or(1)),
        None => (o.to_string(), 1),
    }
}

/// Every channel a rule names must be one of `known` (once channels are configured).
pub fn check_channels(rules: &[Rule], known: &[String]) -> Result<(), RuleError> {
    for r in rules {
        if let Some(c) = r.channels.iter().find(|c| !known.contains(c)) {
            let (origin, line) = split_origin(&r.origin);
            return Err(RuleError::Invalid {
                origin,
                line,
                rule: r.name.clone(),
                message: format!(
                    "channel {c:?} is not configured (known: {})",
                    known.join(", ")
                ),
            });
        }
    }
    Ok(())
}

fn duration(what: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{what} = {s:?} is not a duration: {e}"))
}

/// Checks one rule as written.
pub fn compile(raw: &RuleConfig, origin: String) -> Result<Rule, String> {
    if raw.name.is_empty() || raw.name.len() > 200 || raw.name.chars().any(char::is_control) {
        return Err("name must be 1 to 200 characters, none a control character".into());
    }
    let kind = match raw.kind.as_str() {
        "threshold" => Kind::Threshold,
        "budget" => Kind::Budget,
        "anomaly" => Kind::Anomaly,
        "waste" => Kind::Waste,
        k => {
            return Err(format!(
                "kind {k:?} is not threshold, budget, anomaly or waste"
            ));
        }
    };
    let mut filters = Vec::new();
    for (k, v) in &raw.filters {
        if k != MODEL && !FIELDS.contains(&k.as_str()) {
            return Err(format!(
                "where: unknown field {k:?}; known: {}, {MODEL}",
                FIELDS.join(", ")
            ));
        }
        if v.len() > 1024 {
            return Err(format!("where: the value of {k} is over 1,024 bytes"));
        }
        filters.push((k.clone(), v.clone()));
    }
    let group = if raw.group.is_empty() {
        match kind {
            Kind::Budget => "customer",
            Kind::Waste => "container",
            _ => "run",
        }
    } else {
        raw.group.as_str()
    };
    let group_field = GROUPS
        .iter()
        .find(|(g, _)| *g == group)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            let names: Vec<&str> = GROUPS.iter().map(|(g, _)| *g).collect();
            format!("group {group:?} is not one of {}", names.join(", "))
        })?;
    let measure = MEASURES
        .iter()
        .position(|m| *m == raw.measure)
        .ok_or_else(|| {
            format!(
                "measure {:?} is not one of {}",
                raw.measure,
                MEASURES.join(", ")
            )
        })?;
    let window = if raw.window == "lifetime" {
        Window::Lifetime
    } else {
        let d = duration("window", &raw.window)?;
        if d < Duration::from_secs(1) || d > Duration::from_secs(31 * 24 * 3600) {
            return Err(format!(
                "window = {:?} must be between 1s and 31d",
                raw.window
            ));
        }
        Window::Last(d)
    };
    let aggregate = match raw.aggregate.as_str() {
        "total" => Aggregate::Total,
        "per_second" => Aggregate::PerSecond,
        "per_hour" => Aggregate::PerHour,
        a => return Err(format!("as = {a:?} is not total, per_second or per_hour")),
    };
    if aggregate != Aggregate::Total && window == Window::Lifetime {
        return Err("a rate needs a window of fixed length, not lifetime".into());
    }
    let op = match raw.op.as_str() {
        ">" => Op::Gt,
        ">=" => Op::Ge,
        "<" => Op::Lt,
        "<=" => Op::Le,
        "==" => Op::Eq,
        "!=" => Op::Ne,
        o => return Err(format!("op {o:?} is not one of >, >=, <, <=, ==, !=")),
    };
    let for_ = duration("for", &raw.for_)?;
    let lookback = duration("lookback", &raw.lookback)?;
    if lookback > Duration::from_secs(31 * 24 * 3600) {
        return Err("lookback is over 31d".into());
    }
    let idle = duration("idle", &raw.idle)?;
    let mut value = raw.value.map(|a| a.0);
    let mut budget = Decimal::ZERO;
    match kind {
        Kind::Threshold => {
            if value.is_none() {
                return Err("a threshold rule needs `value`".into());
            }
        }
        Kind::Budget => {
            if !matches!(group, "customer" | "project") {
                return Err(format!("a budget is per customer or project, not {group}"));
            }
            if raw.measure != "cost_total" {
                return Err("a budget is on cost_total".into());
            }
            budget = raw
                .budget
                .map(|a| a.0)
                .ok_or("a budget rule needs `budget`")?;
            if budget <= Decimal::ZERO {
                return Err(format!("budget = {budget} must be positive"));
            }
            if raw.percents.is_empty() || raw.percents.iter().any(|p| *p == 0 || *p > 1000) {
                return Err("percents must be 1 to 1000 each, at least one".into());
            }
        }
        Kind::Anomaly => {
            if group != "run" {
                return Err("an anomaly rule compares runs: group must be run".into());
            }
            if raw.min_history < 3 {
                return Err("min_history must be at least 3".into());
            }
        }
        Kind::Waste => {
            if matches!(window, Window::Lifetime) {
                return Err("a waste rule needs a window of fixed length".into());
            }
            // Default: at least 1 GB held on average.
            value.get_or_insert(Decimal::ONE);
        }
    }
    let z = raw.z.map_or(Decimal::new(35, 1), |a| a.0);
    let max_gpu_busy = raw.max_gpu_busy.map_or(Decimal::new(5, 2), |a| a.0);
    for (k, v) in &raw.labels {
        if !valid_label_name(k) {
            return Err(format!("label name {k:?} is not [a-zA-Z_][a-zA-Z0-9_]*"));
        }
        if k == "alertname" || k == group_field || k == "node" {
            return Err(format!("label {k:?} is set by the agent"));
        }
        if v.len() > 1024 {
            return Err(format!("label {k} is over 1,024 bytes"));
        }
    }
    for (k, t) in &raw.annotations {
        check_template(t, &raw.labels, group_field, kind)
            .map_err(|e| format!("annotation {k}: {e}"))?;
    }
    if raw.channels.iter().any(String::is_empty) {
        return Err("a channel name is empty".into());
    }
    Ok(Rule {
        name: raw.name.clone(),
        kind,
        filters,
        group_field,
        measure,
        window,
        aggregate,
        op,
        value: value.unwrap_or_default(),
        for_,
        labels: raw.labels.clone(),
        annotations: raw.annotations.clone(),
        channels: raw.channels.clone(),
        budget,
        percents: raw.percents.clone(),
        min_history: raw.min_history,
        z,
        lookback,
        idle,
        max_gpu_busy,
        origin,
    })
}

impl Rule {
    /// Whether it sums a long range (see [`AlertingConfig::slow_interval`]).
    pub fn is_slow(&self) -> bool {
        match (self.kind, self.window) {
            (Kind::Budget | Kind::Anomaly, _) | (_, Window::Lifetime) => true,
            (_, Window::Last(w)) => w >= Duration::from_secs(3600),
        }
    }
}

fn valid_label_name(k: &str) -> bool {
    let mut c = k.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// The placeholders of a template, in order; an unclosed `{{` is an error.
fn placeholders(t: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let j = after.find("}}").ok_or("a `{{` is not closed")?;
        out.push(after[..j].trim());
        rest = &after[j + 2..];
    }
    Ok(out)
}

fn check_template(
    t: &str,
    labels: &BTreeMap<String, String>,
    group_field: &str,
    kind: Kind,
) -> Result<(), String> {
    let extra = kind_placeholders(kind);
    for p in placeholders(t)? {
        let known = PLACEHOLDERS.contains(&p)
            || extra.contains(&p)
            || labels.contains_key(p)
            || p == "alertname"
            || p == "node"
            || p == group_field;
        if !known {
            return Err(format!(
                "unknown placeholder {{{{ {p} }}}}; known: {}, {group_field}, alertname, node and the rule's labels",
                PLACEHOLDERS
                    .iter()
                    .chain(extra)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(())
}

/// Fills a checked template: `vars` names every placeholder's value.
pub fn render(t: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            out.push_str(&rest[i..]);
            return out;
        };
        out.push_str(vars.get(after[..j].trim()).map_or("", String::as_str));
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    out
}

impl FromStr for Amount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Decimal::from_str_exact(s)
            .map(Amount)
            .map_err(|e| e.to_string())
    }
}

/// `[alerting]` in the daemon's config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AlertingConfig {
    /// A TOML file of `[[alerts]]`, read at start and on SIGHUP (besides the config's own).
    pub rules_file: Option<PathBuf>,
    /// A firing alert is notified again this often.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub repeat_interval: Duration,
    /// Resolved alerts are listed (`/v1/alerts`) this long, then forgotten.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub keep_resolved: Duration,
    /// Alerts tracked at once (pending, firing, recently resolved); past it, new ones are not tracked (counted).
    pub max_alerts: usize,
    /// Rules over long ranges (budget, anomaly, lifetime windows, windows of 1h or more) are
    /// evaluated again at most this often; between, their last result stands.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub slow_interval: Duration,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        Self {
            rules_file: None,
            repeat_interval: Duration::from_secs(4 * 3600),
            keep_resolved: Duration::from_secs(24 * 3600),
            max_alerts: 10_000,
            slow_interval: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
