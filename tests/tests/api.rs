//! The query API of a running daemon: the aggregation tree conserves exactly, bad
//! parameters get 400 naming the parameter, a token-guarded API refuses requests
//! without the token; and the `usage` CLI on top of it, including `--billing`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use mentat_tests::daemon::{
    Daemon, DaemonOptions, LedgerDir, LedgerRecord, NODE, rfc3339, run_workload, tcp_workload,
};
use mentat_tests::exact::{Exact, exact_json};
use mentat_tests::run_agent;
use serde_json::Value;
use time::OffsetDateTime;

const GROUP_BY: [&str; 3] = ["record_kind", "workload_kind", "comm"];

/// Every numeric total of a tree node, flattened (`cost.total`, ...), exactly.
fn numbers(totals: &Value) -> BTreeMap<String, Exact> {
    let mut out = BTreeMap::new();
    let Some(map) = totals.as_object() else {
        return out;
    };
    for (k, v) in map {
        match v {
            Value::Object(inner) => {
                for (ik, iv) in inner {
                    if iv.is_number() || iv.is_string() {
                        let e = exact_json(iv).unwrap_or_else(|e| panic!("{k}.{ik}: {e:#}"));
                        out.insert(format!("{k}.{ik}"), e);
                    }
                }
            }
            Value::Number(_) => {
                out.insert(
                    k.clone(),
                    exact_json(v).unwrap_or_else(|e| panic!("{k}: {e:#}")),
                );
            }
            // `currency` is the one string that is not a number.
            Value::String(_) if k != "currency" => {
                out.insert(
                    k.clone(),
                    exact_json(v).unwrap_or_else(|e| panic!("{k}: {e:#}")),
                );
            }
            _ => {}
        }
    }
    out
}

/// What one record adds to each total of the tree.
fn record_numbers(r: &LedgerRecord) -> BTreeMap<String, Exact> {
    let raw = &r.raw;
    let mut out = BTreeMap::new();
    let mut put = |k: &str, v: Exact| {
        out.insert(k.to_string(), v);
    };
    put("records", Exact::from_u64(1));
    put(
        "priced_records",
        Exact::from_u64(u64::from(!raw["cost"].is_null())),
    );
    for f in [
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
    ] {
        put(
            f,
            exact_json(&raw[f]).unwrap_or_else(|e| panic!("{f}: {e:#}")),
        );
    }
    for (total, field) in [
        ("tokens_input", "input"),
        ("tokens_cache_read_input", "cache_read_input"),
        ("tokens_output", "output"),
        ("tokens_reasoning_output", "reasoning_output"),
    ] {
        let n: u64 = raw["tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t[field].as_u64().unwrap_or(0))
            .sum();
        put(total, Exact::from_u64(n));
    }
    for c in [
        "cpu", "memory", "gpu", "network", "storage", "token", "subtotal", "discount", "total",
    ] {
        put(
            &format!("cost.{c}"),
            exact_json(&raw["cost"][c]).unwrap_or_else(|e| panic!("cost.{c}: {e:#}")),
        );
    }
    out
}

fn add_into(acc: &mut BTreeMap<String, Exact>, more: &BTreeMap<String, Exact>) {
    for (k, v) in more {
        let slot = acc.entry(k.clone()).or_default();
        *slot = slot.add(*v).expect("exact sum");
    }
}

/// A record's value of a group-by field (None: it lacks it).
fn key_of(r: &LedgerRecord, field: &str) -> Option<String> {
    match &r.raw[field] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        v => Some(v.to_string()),
    }
}

/// Checks `node` (at `path` of keys) against `records` (the records under it) and
/// recurses: its totals are its records' sums, its children's totals add up to its
/// own exactly, and it has an unattributed child exactly when some record under it
/// lacks the next field. Returns how many unattributed nodes were seen.
fn check_node(node: &Value, path: &[String], depth: usize, records: &[&LedgerRecord]) -> usize {
    let totals = numbers(&node["totals"]);
    let mut want = BTreeMap::new();
    for r in records {
        add_into(&mut want, &record_numbers(r));
    }
    for (k, w) in &want {
        let got = totals.get(k).copied().unwrap_or_default();
        assert_eq!(
            got,
            *w,
            "node {path:?}: {k} = {got} in the tree, but its {} records add up to {w}",
            records.len()
        );
    }
    let children = node["children"].as_array().cloned().unwrap_or_default();
    let Some(field) = GROUP_BY.get(depth) else {
        assert!(
            children.is_empty(),
            "node {path:?} below the last level has children"
        );
        return 0;
    };
    // Conservation, for every numeric total the API reports (not just those above).
    let mut sum = BTreeMap::new();
    for c in &children {
        add_into(&mut sum, &numbers(&c["totals"]));
    }
    for (k, parent) in &totals {
        let got = sum.get(k).copied().unwrap_or_default();
        assert_eq!(
            got,
            *parent,
            "node {path:?}: its {} children's {k} add up to {got}, the node says {parent} \
             (off by {} × 10⁻²⁸)",
            children.len(),
            got.0 - parent.0
        );
    }
    let mut groups: BTreeMap<Option<String>, Vec<&LedgerRecord>> = BTreeMap::new();
    for r in records {
        groups.entry(key_of(r, field)).or_default().push(r);
    }
    let keys: Vec<(bool, String)> = children
        .iter()
        .map(|c| {
            (
                c["unattributed"].as_bool().expect("unattributed flag"),
                c["key"].as_str().expect("key").to_string(),
            )
        })
        .collect();
    let want_keys: Vec<(bool, String)> = {
        // Named groups in order, the unattributed one last.
        let mut k: Vec<(bool, String)> = groups
            .keys()
            .flatten()
            .map(|v| (false, v.clone()))
            .collect();
        if groups.contains_key(&None) {
            k.push((true, "unattributed".into()));
        }
        k
    };
    assert_eq!(
        keys, want_keys,
        "node {path:?}: children by {field} (unattributed, key) vs the records' values"
    );
    let mut unattributed = 0;
    for c in &children {
        assert_eq!(c["field"], *field, "node {path:?}: child's field");
        let is_unattributed = c["unattributed"].as_bool() == Some(true);
        let value = (!is_unattributed).then(|| c["key"].as_str().unwrap_or("").to_string());
        let mut p = path.to_vec();
        p.push(c["key"].as_str().unwrap_or("?").to_string());
        unattributed += usize::from(is_unattributed);
        unattributed += check_node(c, &p, depth + 1, &groups[&value]);
    }
    unattributed
}

/// A request that must be refused: path, query, the parameter its message must name,
/// and a word of the bad value it should name too.
type BadRequest<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);

/// Checks that a request is refused with 400 and a message naming `param` (and
/// `names`); returns what was wrong instead.
fn refused(
    daemon: &Daemon,
    path: &str,
    query: &[(&str, &str)],
    param: &str,
    names: &str,
) -> Result<(), String> {
    let r = daemon.get(path, query).map_err(|e| format!("{e:#}"))?;
    let message = r
        .json()
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| r.body.clone());
    if r.status != 400 {
        return Err(format!(
            "GET {path} {query:?}: HTTP {} (400 expected): {message}",
            r.status
        ));
    }
    if !(message.contains(param) && message.contains(names)) {
        return Err(format!(
            "GET {path} {query:?}: the message does not name {param} (and {names:?}): {message}"
        ));
    }
    Ok(())
}

#[test]
fn the_usage_tree_conserves_exactly_and_the_cli_agrees() {
    let t0 = Instant::now();
    let dir = LedgerDir::new().expect("ledger dir");
    let from = rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(5));
    let daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("daemon");
    thread::scope(|s| {
        s.spawn(|| run_workload(&["burn", "--threads", "2", "--ms", "1000"]).expect("burn"));
        s.spawn(|| tcp_workload(16 << 20).expect("tcp"));
    });
    // A range that ended 3 s ago: every window starting in it is committed (1 s
    // windows), so the tree and the records below see the same records.
    thread::sleep(Duration::from_secs(4));
    let to = rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(3));
    let group_by = GROUP_BY.join(",");
    let body = daemon
        .get_json(
            "/v1/usage",
            &[("from", &from), ("to", &to), ("group_by", &group_by)],
        )
        .expect("/v1/usage");
    let records = daemon.records(&from, &to).expect("/v1/records");
    assert!(
        records.len() > 20,
        "only {} records in the range",
        records.len()
    );
    assert_eq!(body["group_by"], serde_json::json!(GROUP_BY), "{body}");
    let all: Vec<&LedgerRecord> = records.iter().collect();
    let unattributed = check_node(&body["root"], &[], 0, &all);
    // Node buckets (idle, kernel, unattributed, ...) have no workload_kind and no comm.
    assert!(
        unattributed > 0,
        "no unattributed node, but bucket records lack workload_kind: {body}"
    );
    let root_records = body["root"]["totals"]["records"].as_u64();
    assert_eq!(
        root_records,
        Some(records.len() as u64),
        "root record count"
    );

    // The CLI: a table with a TOTAL line.
    let out = daemon
        .usage(&["--from", &from, "--to", &to, "--group-by", "workload_kind"])
        .expect("mentat-agent usage");
    let total_line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .unwrap_or_else(|| panic!("no TOTAL line in:\n{}", out.stdout));
    let total_records: u64 = total_line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("TOTAL line without a record count: {total_line:?}"));
    assert_eq!(
        total_records,
        records.len() as u64,
        "the TOTAL line's RECORDS: {total_line:?}"
    );
    assert!(
        out.stdout.contains("USD"),
        "no currency in the table:\n{}",
        out.stdout
    );

    // --billing: one CloudEvent per record, id = record_id.
    let out = daemon
        .usage(&[
            "--from",
            &from,
            "--to",
            &to,
            "--format",
            "jsonl",
            "--billing",
        ])
        .expect("mentat-agent usage --billing");
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["id"].as_str().expect("event id"))
        .collect();
    let ledger_ids: BTreeSet<&str> = records.iter().map(|r| r.record_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        ledger_ids.len(),
        "{} events for {} records",
        ids.len(),
        ledger_ids.len()
    );
    assert_eq!(
        ids.iter().copied().collect::<BTreeSet<_>>(),
        ledger_ids,
        "event ids vs record ids"
    );
    for e in &events {
        assert_eq!(e["specversion"], "1.0", "{e}");
        assert_eq!(e["source"], format!("mentat-agent://{NODE}"), "{e}");
        assert_eq!(e["data"]["record_id"], e["id"], "{e}");
        assert!(e["type"].as_str().is_some_and(|t| !t.is_empty()), "{e}");
        assert!(e["subject"].as_str().is_some_and(|t| !t.is_empty()), "{e}");
    }
    daemon.stop().expect("stopping");
    println!(
        "api: {} records, {unattributed} unattributed nodes; {:?}",
        records.len(),
        t0.elapsed()
    );
}

#[test]
fn bad_parameters_get_400_naming_the_parameter() {
    let dir = LedgerDir::new().expect("ledger dir");
    let daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("daemon");
    let cases: &[BadRequest] = &[
        ("/v1/usage", &[("from", "yesterday")], "`from`", "yesterday"),
        (
            "/v1/usage",
            &[("to", "2026-13-45T00:00:00Z")],
            "`to`",
            "2026-13-45",
        ),
        (
            "/v1/usage",
            &[
                ("from", "2026-01-02T00:00:00Z"),
                ("to", "2026-01-01T00:00:00Z"),
            ],
            "`from`",
            "before",
        ),
        // Valid RFC 3339, but past what the ledger's nanosecond times can hold.
        (
            "/v1/records",
            &[("to", "2999-01-01T00:00:00Z")],
            "`to`",
            "2262",
        ),
        (
            "/v1/usage",
            &[("from", "1600-01-01T00:00:00Z")],
            "`from`",
            "1677",
        ),
        ("/v1/usage", &[("group_by", "bogus")], "`group_by`", "bogus"),
        ("/v1/usage", &[("where", "nofield=1")], "`where`", "nofield"),
        ("/v1/usage", &[("where", "comm")], "`where`", "comm"),
        ("/v1/records", &[("limit", "0")], "`limit`", "0"),
        ("/v1/records", &[("limit", "1001")], "`limit`", "1001"),
        ("/v1/records", &[("after", "garbage")], "`after`", "garbage"),
        ("/v1/records", &[("limit", "abc")], "limit", "limit"),
        // A filter value that cannot be the field's (pid is an integer), and a cursor
        // with the right shape but no time in it, are just as much bad parameters as the
        // ones above: the caller's mistake (400, naming the parameter), not the server's.
        ("/v1/usage", &[("where", "pid=abc")], "`where`", "pid"),
        ("/v1/records", &[("where", "pid=abc")], "`where`", "pid"),
        (
            "/v1/records",
            &[("after", "garbage|x")],
            "`after`",
            "garbage",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(path, query, param, names)| refused(&daemon, path, query, param, names).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} bad requests were not refused with a 400 naming the parameter:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    daemon.stop().expect("stopping");
}

#[test]
fn a_token_guarded_api_refuses_requests_without_the_token() {
    const TOKEN: &str = "s3cret-token-for-the-test";
    let dir = LedgerDir::new().expect("ledger dir");
    let daemon = Daemon::start(
        &dir,
        &DaemonOptions {
            token: Some(TOKEN.into()),
            ..Default::default()
        },
    )
    .expect("daemon with a token");
    for path in ["/v1/usage", "/v1/records", "/metrics"] {
        for (token, want) in [(None, 401), (Some("wrong"), 401), (Some(TOKEN), 200)] {
            let r = daemon.get_as(path, &[], token).expect("request");
            assert_eq!(
                r.status, want,
                "GET {path} with token {token:?}: {}",
                r.body
            );
        }
    }
    for path in ["/healthz", "/readyz"] {
        let r = daemon.get_as(path, &[], None).expect("request");
        assert_eq!(r.status, 200, "GET {path} needs no token: {}", r.body);
    }

    // The CLI reads the token from a file; without one it fails and says why.
    let token_file = dir.path().join("cli-token");
    fs::write(&token_file, TOKEN).expect("token file");
    let api = daemon.url();
    let token_path = token_file.to_string_lossy().into_owned();
    daemon
        .usage(&["--token-file", &token_path])
        .expect("usage with the token");
    let out = run_agent(["usage", "--api", &api], Duration::from_secs(30))
        .expect("usage without the token");
    assert_ne!(out.exit_code, Some(0), "usage without the token succeeded");
    assert!(
        out.stderr.contains("401"),
        "usage without the token: {}",
        out.describe()
    );
    daemon.stop().expect("stopping");
}
