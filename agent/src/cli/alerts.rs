//! `mentat-agent alerts`: list a running agent's alerts (`/v1/alerts`), and
//! `alerts test RULE`: replay one rule over the ledger's history.
//!
//! The replay opens the ledger read-only, evaluates the rule at every step
//! (default one minute) from `--from` to `--to` exactly as the daemon does
//! after a window (same measures, same state machine, `for` included, no
//! notification sent, nothing written), and prints each change: when the
//! rule's alerts would have gone pending, fired and resolved.

use std::{io::Write, path::Path, time::Duration};

use serde_json::Value;

use super::usage::{QueryError, UsageQuery};
use crate::{
    alert::{
        AlertState,
        engine::compile_config,
        eval::{Measurer, ns},
        rules::{self, Rule, RuleError},
        state::{StateConfig, StateTable, state_name},
    },
    config::Config,
    ledger::{Ledger, LedgerError},
    probes::clock::{rfc3339_of_ns, unix_ns_of},
};

/// Prints `/v1/alerts` as a table or JSON.
pub fn list(
    q: &UsageQuery,
    state: Option<&str>,
    rule: Option<&str>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), QueryError> {
    let mut params = Vec::new();
    if let Some(s) = state {
        params.push(("state".to_string(), s.to_string()));
    }
    if let Some(r) = rule {
        params.push(("rule".to_string(), r.to_string()));
    }
    let body = q.get("/v1/alerts", &params)?;
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<9} {:<24} {:<36} {:>14} {:>14}  {:<30} INHIBITED",
        "STATE", "RULE", "GROUP", "VALUE", "THRESHOLD", "SINCE"
    )?;
    let empty = Vec::new();
    for a in body["alerts"].as_array().unwrap_or(&empty) {
        let s = |k: &str| a[k].as_str().unwrap_or("").to_string();
        writeln!(
            out,
            "{:<9} {:<24} {:<36} {:>14} {:>14}  {:<30} {}",
            s("state"),
            s("rule"),
            format!("{}={}", s("group_field"), s("group")),
            s("value"),
            s("threshold"),
            s("starts_at"),
            if a["inhibited"] == Value::Bool(true) {
                "yes"
            } else {
                "no"
            }
        )?;
    }
    Ok(())
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The rules do not load.
    #[error(transparent)]
    Rules(#[from] RuleError),
    /// No rule has that name.
    #[error("no alert rule named {name:?}; rules: {known}")]
    NoRule {
        /// Asked for.
        name: String,
        /// The rules there are.
        known: String,
    },
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A bad time argument.
    #[error("{0}")]
    Time(String),
    /// Writing failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// The rules a config puts in force (its own and its rules file's).
pub fn config_rules(config: &Config) -> Result<Vec<Rule>, RuleError> {
    let own = compile_config(&config.alerts)?;
    let file = match &config.alerting.rules_file {
        Some(f) => rules::load_file(f)?,
        None => Vec::new(),
    };
    rules::merge(own, file)
}

/// Replays rule `name` of `rules` over the ledger at `ledger` from `from` to
/// `to` (RFC 3339; default: the hour before the last committed window), one
/// evaluation per `step`. Returns how many times it would have fired.
pub fn test(
    rules: &[Rule],
    name: &str,
    ledger: &Path,
    from: Option<&str>,
    to: Option<&str>,
    step: Duration,
    out: &mut dyn Write,
) -> Result<usize, TestError> {
    let rule = rules
        .iter()
        .find(|r| r.name == name)
        .cloned()
        .ok_or_else(|| TestError::NoRule {
            name: name.to_string(),
            known: rules
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let l = Ledger::open_read_only(ledger)?;
    let time =
        |s: &str| unix_ns_of(s).ok_or_else(|| TestError::Time(format!("{s:?} is not RFC 3339")));
    let to = match to {
        Some(t) => time(t)?,
        None => l
            .last_window_end_ns()?
            .ok_or_else(|| TestError::Time("the ledger has no window yet".into()))?,
    };
    let from = match from {
        Some(f) => time(f)?,
        None => to - 3_600_000_000_000,
    };
    let step = ns(step).max(1_000_000);
    let cfg = StateConfig {
        node: String::new(),
        repeat_interval: Duration::from_secs(u64::MAX / 4),
        keep_resolved: Duration::from_secs(u64::MAX / 4),
        max_alerts: usize::MAX,
        all_channels: Vec::new(),
    };
    let one = [rule];
    let mut table = StateTable::default();
    let mut fired = 0;
    writeln!(
        out,
        "rule {:?} ({}) from {} to {} every {:?}",
        one[0].name,
        one[0].origin,
        rfc3339_of_ns(from),
        rfc3339_of_ns(to),
        Duration::from_nanos(u64::try_from(step).unwrap_or(0))
    )?;
    let mut at = from;
    let mut before: std::collections::BTreeMap<String, AlertState> = Default::default();
    while at <= to {
        let obs = Measurer::new(&l).observe(0, &one[0], at)?;
        table.step(&one, &obs, at, &cfg, &mut |_, _| false);
        for a in table.alerts.values() {
            if before.get(&a.fingerprint) != Some(&a.state) {
                if a.state == AlertState::Firing {
                    fired += 1;
                }
                writeln!(
                    out,
                    "{}  {:<8} {}={}  value {} (threshold {})",
                    rfc3339_of_ns(at),
                    state_name(a.state),
                    a.group_field,
                    a.group,
                    a.value,
                    a.threshold
                )?;
            }
        }
        before = table
            .alerts
            .values()
            .map(|a| (a.fingerprint.clone(), a.state))
            .collect();
        at += step;
    }
    writeln!(out, "{fired} firing")?;
    Ok(fired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::testutil::{R, S, T0, Temp, commit};

    #[test]
    fn a_replay_prints_when_the_rule_would_have_fired_and_resolved() {
        let t = Temp::new("replay");
        let mut l = t.ledger();
        let run = |r, cost| R {
            run: Some(r),
            cost,
            ..R::default()
        };
        commit(&mut l, T0, &[run("r1", "6"), run("r2", "1")]);
        drop(l);
        let rules = rules::parse_text(
            "[[alerts]]\nname = \"cost\"\nwindow = \"1m\"\nvalue = \"5\"\nfor = \"20s\"\n",
            "t.toml",
        )
        .expect("rules");
        let mut out = Vec::new();
        let fired = test(
            &rules,
            "cost",
            &t.db(),
            Some(&rfc3339_of_ns(T0 - 60 * S)),
            Some(&rfc3339_of_ns(T0 + 120 * S)),
            Duration::from_secs(10),
            &mut out,
        )
        .expect("replay");
        let out = String::from_utf8(out).expect("utf8");
        assert_eq!(fired, 1, "{out}");
        // The record starts at T0: in the window from the step after it,
        // firing 20 s later, resolved once it leaves the 1-minute window.
        let lines: Vec<&str> = out.lines().skip(1).collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(
            lines[0].starts_with(&format!(
                "{}  pending  run_id=r1  value 6",
                rfc3339_of_ns(T0 + 10 * S)
            )),
            "{out}"
        );
        assert!(
            lines[1].starts_with(&format!(
                "{}  firing   run_id=r1",
                rfc3339_of_ns(T0 + 30 * S)
            )),
            "{out}"
        );
        assert!(
            lines[2].starts_with(&format!(
                "{}  resolved run_id=r1",
                rfc3339_of_ns(T0 + 70 * S)
            )),
            "{out}"
        );
        assert_eq!(lines[3], "1 firing");
        let e = test(
            &rules,
            "nope",
            &t.db(),
            None,
            None,
            Duration::from_secs(60),
            &mut Vec::new(),
        )
        .expect_err("unknown rule")
        .to_string();
        assert!(
            e.contains("no alert rule named \"nope\"; rules: cost"),
            "{e}"
        );
    }
}
