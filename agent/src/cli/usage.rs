//! `mentat-agent usage`: the query API from the command line.
//!
//! Reads a running agent's API (default 127.0.0.1:9464) and prints the usage
//! tree as a table with totals and currency, as JSON or CSV; or, with
//! `--billing`, every record in the range as a CloudEvent per line for a
//! billing system to ingest idempotently (the event id is the record id).

use std::{
    io::{self, Write},
    path::PathBuf,
    time::Duration,
};

use rust_decimal::Decimal;
use serde_json::{Value, json};

/// What to ask the API and how to print it.
#[derive(Clone, Debug)]
pub struct UsageQuery {
    /// The API's base URL.
    pub api: String,
    /// A bearer token file, when the API needs one.
    pub token_file: Option<PathBuf>,
    /// RFC 3339 range start (or `since`).
    pub from: Option<String>,
    /// RFC 3339 range end.
    pub to: Option<String>,
    /// A duration back from now (`--since 1h`).
    pub since: Option<Duration>,
    /// Group-by fields, outermost first.
    pub group_by: Vec<String>,
    /// `field=value` filters.
    pub filters: Vec<String>,
    /// Output format.
    pub format: UsageFormat,
    /// Emit CloudEvents (records) instead of the tree.
    pub billing: bool,
    /// Show one run's cost by agent and span, and its critical path.
    pub run: Option<String>,
    /// List quarantined records and dead letters instead of usage.
    pub quarantine: bool,
    /// List the tokens priced at 0 because the book had no price for their model, per model.
    pub unpriced: bool,
}

/// Output formats of `usage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageFormat {
    /// Indented tree with totals and currency.
    Table,
    /// The API's JSON.
    Json,
    /// One row per tree node.
    Csv,
    /// One JSON object per line (with --billing: CloudEvents).
    Jsonl,
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The API could not be reached or answered with an error.
    #[error("querying {url}: {message}")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong (the API's error message where it gave one).
        message: String,
    },
    /// The token file could not be read.
    #[error("reading the token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

impl UsageQuery {
    fn range_params(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if let Some(since) = self.since {
            let from = std::time::SystemTime::now() - since;
            p.push(("from".into(), crate::probes::clock::rfc3339(from)));
        }
        if let Some(f) = &self.from {
            p.push(("from".into(), f.clone()));
        }
        if let Some(t) = &self.to {
            p.push(("to".into(), t.clone()));
        }
        if !self.filters.is_empty() {
            p.push(("where".into(), self.filters.join(",")));
        }
        p
    }

    /// GETs `path` from the API with `params`, as JSON (errors carry the API's message).
    pub(crate) fn get(&self, path: &str, params: &[(String, String)]) -> Result<Value, QueryError> {
        let url = format!("{}{path}", self.api.trim_end_matches('/'));
        let mut req = ureq::get(&url);
        for (k, v) in params {
            req = req.query(k, v);
        }
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path).map_err(|source| QueryError::Token {
                path: path.clone(),
                source,
            })?;
            req = req.header("Authorization", format!("Bearer {}", token.trim()));
        }
        let http = |message: String| QueryError::Http {
            url: url.clone(),
            message,
        };
        let mut resp = req
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .map_err(|e| {
                http(format!(
                    "{e} (is `mentat-agent run` running with the API on?)"
                ))
            })?;
        let status = resp.status();
        let body: Value = resp
            .body_mut()
            .read_json()
            .map_err(|e| http(format!("HTTP {status}: unreadable body: {e}")))?;
        if !status.is_success() {
            let msg = body["error"].as_str().unwrap_or("no message").to_string();
            return Err(http(format!("HTTP {status}: {msg}")));
        }
        Ok(body)
    }

    /// Runs the query and prints it.
    pub fn run(&self, out: &mut dyn Write) -> Result<(), QueryError> {
        if let Some(run) = &self.run {
            let body = self.get(&format!("/v1/runs/{}", url_segment(run)), &[])?;
            return match self.format {
                UsageFormat::Table => write_run(out, &body).map_err(Into::into),
                _ => Ok(write_pretty(out, &body)?),
            };
        }
        if self.billing {
            return self.billing_events(out);
        }
        if self.quarantine {
            return self.quarantined(out);
        }
        if self.unpriced {
            return self.unpriced_tokens(out);
        }
        let mut params = self.range_params();
        if !self.group_by.is_empty() {
            params.push(("group_by".into(), self.group_by.join(",")));
        }
        let body = self.get("/v1/usage", &params)?;
        match self.format {
            UsageFormat::Json => write_pretty(out, &body)?,
            UsageFormat::Jsonl => {
                for (path, node) in flatten(&body["root"]) {
                    writeln!(out, "{}", json!({ "path": path, "totals": node["totals"] }))?;
                }
            }
            UsageFormat::Csv => write_csv(out, &body)?,
            UsageFormat::Table => write_table(out, &body)?,
        }
        Ok(())
    }

    /// Every quarantined record (page by page) and the newest dead letters.
    fn quarantined(&self, out: &mut dyn Write) -> Result<(), QueryError> {
        let mut before: Option<String> = None;
        let mut first = true;
        loop {
            let mut params = vec![("limit".to_string(), "1000".to_string())];
            if let Some(b) = &before {
                params.push(("before".into(), b.clone()));
            }
            let page = self.get("/v1/quarantine", &params)?;
            match self.format {
                UsageFormat::Json => write_pretty(out, &page)?,
                UsageFormat::Jsonl => {
                    for r in page["records"].as_array().into_iter().flatten() {
                        writeln!(out, "{}", json!({ "quarantined": r }))?;
                    }
                    if first {
                        for d in page["dead_letters"].as_array().into_iter().flatten() {
                            writeln!(out, "{}", json!({ "dead_letter": d }))?;
                        }
                    }
                }
                UsageFormat::Table | UsageFormat::Csv => {
                    write_quarantine(out, &page, first, self.format == UsageFormat::Csv)?
                }
            }
            first = false;
            match page["next"].as_i64() {
                Some(n) if self.format != UsageFormat::Json => before = Some(n.to_string()),
                _ => return Ok(()),
            }
        }
    }

    /// The range's token records, page by page, summed per model over the
    /// usages pricing marked `unpriced` (tokens priced at 0).
    fn unpriced_tokens(&self, out: &mut dyn Write) -> Result<(), QueryError> {
        #[derive(Default)]
        struct Row {
            usages: u64,
            input: u64,
            output: u64,
            versions: std::collections::BTreeSet<String>,
        }
        let mut rows: std::collections::BTreeMap<String, Row> = Default::default();
        let mut after: Option<String> = None;
        loop {
            let mut params = self.range_params();
            match params.iter_mut().find(|(k, _)| k == "where") {
                Some((_, w)) => w.push_str(",record_kind=tokens"),
                None => params.push(("where".into(), "record_kind=tokens".into())),
            }
            params.push(("limit".into(), "1000".into()));
            if let Some(a) = &after {
                params.push(("after".into(), a.clone()));
            }
            let page = self.get("/v1/records", &params)?;
            for r in page["records"].as_array().into_iter().flatten() {
                let version = r["cost"]["pricing_version"].as_str().unwrap_or("");
                for t in r["tokens"].as_array().into_iter().flatten() {
                    if t["unpriced"].as_bool() != Some(true) {
                        continue;
                    }
                    let row = rows
                        .entry(t["model"].as_str().unwrap_or("").to_string())
                        .or_default();
                    row.usages += 1;
                    row.input = row.input.saturating_add(t["input"].as_u64().unwrap_or(0));
                    row.output = row.output.saturating_add(t["output"].as_u64().unwrap_or(0));
                    row.versions.insert(version.to_string());
                }
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => break,
            }
        }
        let json_row = |model: &String, r: &Row| {
            json!({
                "model": model,
                "usages": r.usages,
                "tokens_input": r.input,
                "tokens_output": r.output,
                "pricing_versions": r.versions,
            })
        };
        match self.format {
            UsageFormat::Json => {
                let all: Vec<Value> = rows.iter().map(|(m, r)| json_row(m, r)).collect();
                write_pretty(out, &all)?;
            }
            UsageFormat::Jsonl => {
                for (m, r) in &rows {
                    writeln!(out, "{}", json_row(m, r))?;
                }
            }
            UsageFormat::Csv => {
                writeln!(
                    out,
                    "model,usages,tokens_input,tokens_output,pricing_versions"
                )?;
                for (m, r) in &rows {
                    let versions: Vec<&str> = r.versions.iter().map(String::as_str).collect();
                    writeln!(
                        out,
                        "{},{},{},{},{}",
                        crate::cli::output::csv_field(m),
                        r.usages,
                        r.input,
                        r.output,
                        crate::cli::output::csv_field(&versions.join(" "))
                    )?;
                }
            }
            UsageFormat::Table => {
                if rows.is_empty() {
                    writeln!(out, "no unpriced tokens in the range")?;
                }
                for (m, r) in &rows {
                    let versions: Vec<&str> = r.versions.iter().map(String::as_str).collect();
                    writeln!(
                        out,
                        "{m:<40} {:>8} usages  in {:>12}  out {:>12}  book {}",
                        r.usages,
                        r.input,
                        r.output,
                        versions.join(", ")
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Every record in the range as a CloudEvent (JSON lines), page by page.
    fn billing_events(&self, out: &mut dyn Write) -> Result<(), QueryError> {
        let mut after: Option<String> = None;
        loop {
            let mut params = self.range_params();
            params.push(("limit".into(), "1000".into()));
            if let Some(a) = &after {
                params.push(("after".into(), a.clone()));
            }
            let page = self.get("/v1/records", &params)?;
            for r in page["records"].as_array().into_iter().flatten() {
                writeln!(out, "{}", cloud_event(r))?;
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return Ok(()),
            }
        }
    }
}

/// A usage record as a CloudEvents 1.0 event (structured JSON mode).
///
/// `id` is the record id, so a consumer that stores ids ingests each record
/// once however often it is replayed; `source` is the node; `subject` is who
/// is billed (the customer, else the user, else "unattributed").
pub fn cloud_event(r: &Value) -> Value {
    // As `UsageRecord::billed_party`: an empty id is no id.
    let named = |k: &str| r[k].as_str().filter(|s| !s.is_empty());
    let subject = named("customer_id")
        .or_else(|| named("user_id"))
        .unwrap_or("unattributed");
    json!({
        "specversion": "1.0",
        "id": r["record_id"],
        "source": format!("mentat-agent://{}", r["node"].as_str().unwrap_or("unknown-node")),
        "type": "dev.mentat.usage.v1",
        "subject": subject,
        "time": r["window_end"],
        "datacontenttype": "application/json",
        "data": r,
    })
}

/// Percent-encodes a path segment (run ids are free text).
fn url_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A run: totals, by agent, spans with cost, critical path.
fn write_run(out: &mut dyn Write, body: &Value) -> io::Result<()> {
    let t = &body["totals"];
    let currency = t["currency"].as_str().unwrap_or("");
    writeln!(
        out,
        "run {}  duration {:.3} s  cost {} {}  cpu {:.6} s  tokens in {} out {}",
        body["run_id"].as_str().unwrap_or("?"),
        body["duration_ns"].as_i64().unwrap_or(0) as f64 / 1e9,
        dec(&t["cost"]["total"]).round_dp(6),
        currency,
        dec(&t["cpu_core_seconds"]),
        t["tokens_input"].as_u64().unwrap_or(0),
        t["tokens_output"].as_u64().unwrap_or(0),
    )?;
    if body["pending"].as_bool() == Some(true) {
        writeln!(
            out,
            "PENDING: {}",
            crate::cli::output::printable(
                body["message"].as_str().unwrap_or("not all committed yet")
            )
        )?;
        if let Some(c) = body["committed_through"].as_str() {
            writeln!(out, "  committed through {c}")?;
        }
    }
    writeln!(out, "\nby agent:")?;
    writeln!(
        out,
        "  {:<24} {:>12} {:>10} {:>10} {:>14}",
        "AGENT",
        "CPU_SEC",
        "TOK_IN",
        "TOK_OUT",
        format!("COST {currency}")
    )?;
    for a in body["by_agent"].as_array().into_iter().flatten() {
        let at = &a["totals"];
        writeln!(
            out,
            "  {:<24} {:>12.6} {:>10} {:>10} {:>14}",
            crate::cli::output::printable(a["agent_id"].as_str().unwrap_or("(none)")),
            dec(&at["cpu_core_seconds"]),
            at["tokens_input"].as_u64().unwrap_or(0),
            at["tokens_output"].as_u64().unwrap_or(0),
            dec(&at["cost"]["total"]).round_dp(6),
        )?;
    }
    write_models(out, body, currency)?;
    writeln!(
        out,
        "\nspans (cost inclusive of children; * on the critical path):"
    )?;
    for s in body["spans"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {} {:<32} {:<16} {:>10.3} s {:>14}",
            if s["on_critical_path"].as_bool() == Some(true) {
                "*"
            } else {
                " "
            },
            crate::cli::output::printable(s["name"].as_str().unwrap_or("?")),
            crate::cli::output::printable(s["agent_id"].as_str().unwrap_or("")),
            s["duration_ns"].as_i64().unwrap_or(0) as f64 / 1e9,
            dec(&s["cost"]).round_dp(6),
        )?;
    }
    let path: Vec<&str> = body["critical_path"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    writeln!(out, "\ncritical path: {}", path.join(" → "))?;
    Ok(())
}

/// A run's tokens and token cost by model, then by agent and model.
fn write_models(out: &mut dyn Write, body: &Value, currency: &str) -> io::Result<()> {
    let header = |out: &mut dyn Write, first: &str| {
        writeln!(
            out,
            "  {:<40} {:>10} {:>10} {:>10} {:>10} {:>10} {:>18}",
            first,
            "IN",
            "CACHE_RD",
            "CACHE_WR",
            "OUT",
            "REASON",
            format!("TOKEN_COST {currency}")
        )
    };
    let row = |out: &mut dyn Write, first: String, m: &Value| {
        let t = &m["tokens"];
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        writeln!(
            out,
            "  {:<40} {:>10} {:>10} {:>10} {:>10} {:>10} {:>18}",
            crate::cli::output::printable(&first),
            n("input"),
            n("cache_read_input"),
            n("cache_creation_input"),
            n("output"),
            n("reasoning_output"),
            dec(&m["token_cost"]),
        )
    };
    let name = |v: &Value| v.as_str().unwrap_or("(none)").to_string();
    writeln!(out, "\nby model (tokens; cost exact):")?;
    header(out, "MODEL")?;
    for m in body["by_model"].as_array().into_iter().flatten() {
        row(out, name(&m["model"]), m)?;
    }
    writeln!(out, "\nby agent × model:")?;
    header(out, "AGENT / MODEL")?;
    for m in body["by_agent_model"].as_array().into_iter().flatten() {
        row(
            out,
            format!("{} / {}", name(&m["agent_id"]), name(&m["model"])),
            m,
        )?;
    }
    Ok(())
}

/// Every node of the tree with its path of keys, depth first.
fn flatten(root: &Value) -> Vec<(Vec<String>, &Value)> {
    let mut out = Vec::new();
    fn walk<'a>(node: &'a Value, path: Vec<String>, out: &mut Vec<(Vec<String>, &'a Value)>) {
        out.push((path.clone(), node));
        for child in node["children"].as_array().into_iter().flatten() {
            let mut p = path.clone();
            p.push(child["key"].as_str().unwrap_or("?").to_string());
            walk(child, p, out);
        }
    }
    walk(root, Vec::new(), &mut out);
    out
}

fn dec(v: &Value) -> Decimal {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64().map(Decimal::from))
        .unwrap_or_default()
}

/// Quarantined records (and, on the first page, dead letters) as a table or CSV.
fn write_quarantine(out: &mut dyn Write, page: &Value, first: bool, csv: bool) -> io::Result<()> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    if first {
        if csv {
            writeln!(out, "what,at,window_start,record_id,kind,run_id,reason")?;
        } else {
            writeln!(
                out,
                "{} records quarantined (newest first)",
                page["quarantined"].as_u64().unwrap_or(0)
            )?;
            writeln!(
                out,
                "{:<31} {:<31} {:<34} {:<12} {:<20} REASON",
                "QUARANTINED_AT", "WINDOW_START", "RECORD_ID", "KIND", "RUN_ID"
            )?;
        }
    }
    for r in page["records"].as_array().into_iter().flatten() {
        let cols = [
            s(&r["quarantined_at"]),
            s(&r["window_start"]),
            s(&r["record_id"]),
            s(&r["record_kind"]),
            s(&r["run_id"]),
            s(&r["reason"]),
        ];
        if csv {
            writeln!(out, "quarantined,{}", crate::cli::output::csv_line(&cols))?;
        } else {
            writeln!(
                out,
                "{:<31} {:<31} {:<34} {:<12} {:<20} {}",
                cols[0], cols[1], cols[2], cols[3], cols[4], cols[5]
            )?;
        }
    }
    if !first {
        return Ok(());
    }
    let dead = page["dead_letters"].as_array().cloned().unwrap_or_default();
    if !csv && !dead.is_empty() {
        writeln!(
            out,
            "\n{} dead letters (newest first; exporters' receivers refused them)",
            dead.len()
        )?;
        writeln!(
            out,
            "{:<31} {:<31} {:<34} {:<12} REASON",
            "AT", "WINDOW_START", "RECORD_ID", "EXPORTER"
        )?;
    }
    for d in &dead {
        if csv {
            let cols = [
                s(&d["dead_at"]),
                s(&d["window_start"]),
                s(&d["record_id"]),
                s(&d["exporter"]),
                String::new(),
                s(&d["reason"]),
            ];
            writeln!(out, "dead_letter,{}", crate::cli::output::csv_line(&cols))?;
        } else {
            writeln!(
                out,
                "{:<31} {:<31} {:<34} {:<12} {}",
                s(&d["dead_at"]),
                s(&d["window_start"]),
                s(&d["record_id"]),
                s(&d["exporter"]),
                s(&d["reason"])
            )?;
        }
    }
    Ok(())
}

fn write_table(out: &mut dyn Write, body: &Value) -> io::Result<()> {
    let root = &body["root"];
    let currency = root["totals"]["currency"].as_str().unwrap_or("");
    writeln!(
        out,
        "usage {} → {}{}",
        body["from"].as_str().unwrap_or("?"),
        body["to"].as_str().unwrap_or("?"),
        match body["group_by"].as_array() {
            Some(g) if !g.is_empty() => format!(
                "  by {}",
                g.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" › ")
            ),
            _ => String::new(),
        }
    )?;
    writeln!(
        out,
        "{:<40} {:>8} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "GROUP",
        "RECORDS",
        "CPU_SEC",
        "MEM_GBS",
        "NET_RX_B",
        "NET_TX_B",
        format!("COST {currency}")
    )?;
    for (path, node) in flatten(root) {
        let t = &node["totals"];
        let label = match path.last() {
            None => "TOTAL".to_string(),
            Some(k) => format!("{}{k}", "  ".repeat(path.len() - 1)),
        };
        writeln!(
            out,
            "{:<40} {:>8} {:>12.6} {:>12.6} {:>12} {:>12} {:>14}",
            crate::cli::output::printable(&label),
            t["records"].as_u64().unwrap_or(0),
            dec(&t["cpu_core_seconds"]),
            dec(&t["memory_gb_seconds"]),
            t["network_rx_bytes"].as_u64().unwrap_or(0),
            t["network_tx_bytes"].as_u64().unwrap_or(0),
            // Per-process costs are often fractions of a cent: six decimals
            // in the table; JSON and CSV carry the exact amounts.
            dec(&t["cost"]["total"]).round_dp(6).to_string(),
        )?;
    }
    Ok(())
}

fn write_csv(out: &mut dyn Write, body: &Value) -> io::Result<()> {
    let fields: Vec<&str> = body["group_by"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut header: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
    header.extend(
        [
            "records",
            "cpu_core_seconds",
            "memory_gb_seconds",
            "network_rx_bytes",
            "network_tx_bytes",
            "disk_read_bytes",
            "disk_write_bytes",
            "cost_total",
            "currency",
        ]
        .map(String::from),
    );
    writeln!(out, "{}", header.join(","))?;
    for (path, node) in flatten(&body["root"]) {
        let t = &node["totals"];
        let mut row: Vec<String> = (0..fields.len())
            .map(|i| path.get(i).cloned().unwrap_or_default())
            .collect();
        row.extend([
            t["records"].as_u64().unwrap_or(0).to_string(),
            dec(&t["cpu_core_seconds"]).to_string(),
            dec(&t["memory_gb_seconds"]).to_string(),
            t["network_rx_bytes"].as_u64().unwrap_or(0).to_string(),
            t["network_tx_bytes"].as_u64().unwrap_or(0).to_string(),
            t["disk_read_bytes"].as_u64().unwrap_or(0).to_string(),
            t["disk_write_bytes"].as_u64().unwrap_or(0).to_string(),
            dec(&t["cost"]["total"]).to_string(),
            t["currency"].as_str().unwrap_or("").to_string(),
        ]);
        writeln!(out, "{}", crate::cli::output::csv_line(&row))?;
    }
    Ok(())
}

/// `v` as indented JSON, on lines of its own (`--format json`).
fn write_pretty<T: serde::Serialize + ?Sized>(out: &mut dyn Write, v: &T) -> std::io::Result<()> {
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_events_carry_the_record_id_and_billed_party() {
        let r = json!({"record_id": "abc", "node": "n1", "window_end": "2026-01-01T00:00:01Z", "user_id": "u", "customer_id": null});
        let e = cloud_event(&r);
        assert_eq!(e["id"], "abc");
        assert_eq!(e["source"], "mentat-agent://n1");
        assert_eq!(e["subject"], "u");
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["data"]["record_id"], "abc");
    }

    #[test]
    fn tree_flattens_depth_first_with_paths() {
        let root = json!({"totals": {}, "children": [
            {"key": "a", "totals": {}, "children": [{"key": "x", "totals": {}, "children": []}]},
            {"key": "unattributed", "totals": {}, "children": []}]});
        let paths: Vec<Vec<String>> = flatten(&root).into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            vec![
                vec![],
                vec!["a".to_string()],
                vec!["a".into(), "x".into()],
                vec!["unattributed".into()]
            ]
        );
    }
}
