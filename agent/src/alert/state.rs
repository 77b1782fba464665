//! The alert state machine: pending → firing (after `for`) → resolved, with
//! repeats, inhibition and a bound on what is tracked.
//!
//! In: each evaluation's observations (the groups whose condition holds) and
//! which alerts are inhibited. Out: the [`AlertEvent`]s to notify (only
//! firing, its repeats, and resolved, and only for alerts whose firing was
//! announced), and the changed states to persist.
//!
//! Invariants: an alert is identified by its fingerprint (a stable hash of
//! the rule, the group key and the alert's extra labels), so the same
//! condition after a restart is the same alert. A firing alert loaded from
//! the ledger is not announced again: `notified` and `last_sent_ns` travel
//! with it, and the next notification is its repeat, `repeat_interval` after
//! the last. An inhibited alert keeps its state and sends nothing (a resolve
//! of one already announced is still sent).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    AlertEvent, AlertState,
    eval::{Observation, ns},
    rules::{Kind, Rule, render},
};
use crate::{ledger::alerts::AlertRow, probes::clock::rfc3339_of_ns, report::record::stable_id};

/// One alert's state, as persisted (JSON) and listed on `/v1/alerts`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlertStatus {
    /// Stable hash of (rule, group, extra labels).
    pub fingerprint: String,
    /// The rule's name.
    pub rule: String,
    /// The rule's kind.
    pub kind: String,
    /// Where it is.
    pub state: AlertState,
    /// Silenced by a firing budget alert of its customer or project.
    #[serde(default)]
    pub inhibited: bool,
    /// The ledger field it is per (`run_id`, ...).
    pub group_field: String,
    /// That field's value.
    pub group: String,
    /// Labels as notified.
    pub labels: BTreeMap<String, String>,
    /// Annotations, templates filled in.
    pub annotations: BTreeMap<String, String>,
    /// The value last seen while the condition held (exact decimal text).
    pub value: String,
    /// What it was compared with.
    pub threshold: String,
    /// When the condition began to hold (RFC 3339).
    pub starts_at: String,
    /// When it fired.
    pub fired_at: Option<String>,
    /// When it resolved.
    pub ends_at: Option<String>,
    /// When it last changed.
    pub updated_at: String,
    /// Where its notifications go.
    pub channels: Vec<String>,
    /// Its firing was notified (so its resolve is too).
    #[serde(default)]
    pub notified: bool,
    /// Repeats sent of the current firing.
    #[serde(default)]
    pub repeat: u32,
    /// When it was last notified (ns).
    #[serde(default)]
    pub last_sent_ns: i64,
    /// `starts_at` in ns.
    pub since_ns: i64,
    /// `updated_at` in ns.
    pub updated_ns: i64,
    /// When this state was last written with a fresh value (ns).
    #[serde(default)]
    pub saved_ns: i64,
}

/// How often a held alert's value is written when nothing else changes.
const VALUE_REFRESH: Duration = Duration::from_secs(10);

/// Settings of the state machine.
#[derive(Clone, Debug)]
pub struct StateConfig {
    /// This node's name (the `node` label).
    pub node: String,
    /// A firing alert is notified again this often.
    pub repeat_interval: Duration,
    /// Resolved alerts are kept (listed) this long.
    pub keep_resolved: Duration,
    /// Alerts tracked at most.
    pub max_alerts: usize,
    /// Channels of a rule that names none.
    pub all_channels: Vec<String>,
}

/// Whether an alert is silenced, given the firing budget alerts' (field, value).
pub type Inhibits<'a> = dyn FnMut(&AlertStatus, &[(String, String)]) -> bool + 'a;

/// Every tracked alert, and what changed since the last save.
#[derive(Debug, Default)]
pub struct StateTable {
    /// By fingerprint.
    pub alerts: BTreeMap<String, AlertStatus>,
    dirty: BTreeSet<String>,
    deleted: BTreeSet<String>,
    /// New alerts not tracked because `max_alerts` were.
    pub untracked: u64,
}

/// The fingerprint of an alert.
pub fn fingerprint(
    rule: &str,
    field: &str,
    group: &str,
    extra: &BTreeMap<String, String>,
) -> String {
    let mut parts: Vec<&[u8]> = vec![rule.as_bytes(), field.as_bytes(), group.as_bytes()];
    for (k, v) in extra {
        parts.push(k.as_bytes());
        parts.push(v.as_bytes());
    }
    stable_id(&parts)
}

impl StateTable {
    /// From persisted bodies (ones that do not decode are skipped and counted in the result).
    pub fn from_bodies(bodies: &[String]) -> (Self, usize) {
        let mut t = StateTable::default();
        let mut bad = 0;
        for b in bodies {
            match serde_json::from_str::<AlertStatus>(b) {
                Ok(a) => {
                    t.alerts.insert(a.fingerprint.clone(), a);
                }
                Err(_) => bad += 1,
            }
        }
        (t, bad)
    }

    /// The rows to write and the fingerprints to delete since the last call.
    pub fn take_changes(&mut self) -> (Vec<AlertRow>, Vec<String>) {
        let rows = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|f| self.alerts.get(&f))
            .map(|a| AlertRow {
                fingerprint: a.fingerprint.clone(),
                rule: a.rule.clone(),
                state: state_name(a.state).into(),
                updated_ns: a.updated_ns,
                body: serde_json::to_string(a).unwrap_or_default(),
            })
            .collect();
        (
            rows,
            std::mem::take(&mut self.deleted).into_iter().collect(),
        )
    }

    /// Counts by state: (pending, firing, inhibited).
    pub fn counts(&self) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for a in self.alerts.values() {
            match a.state {
                AlertState::Pending => c.0 += 1,
                AlertState::Firing => c.1 += 1,
                AlertState::Resolved => {}
            }
            if a.inhibited && a.state != AlertState::Resolved {
                c.2 += 1;
            }
        }
        c
    }

    fn touch(&mut self, f: &str) {
        self.dirty.insert(f.to_string());
        self.deleted.remove(f);
    }

    fn forget(&mut self, f: &str) {
        self.alerts.remove(f);
        self.dirty.remove(f);
        self.deleted.insert(f.to_string());
    }

    /// Room for one more alert: forgets the oldest resolved one at the bound.
    /// `full` remembers, within one step, that there was none to forget (so
    /// a flood of new alerts past the bound costs one scan, not one each).
    fn room(&mut self, max: usize, full: &mut bool) -> bool {
        if self.alerts.len() < max {
            return true;
        }
        if *full {
            return false;
        }
        let oldest = self
            .alerts
            .values()
            .filter(|a| a.state == AlertState::Resolved)
            .min_by_key(|a| a.updated_ns)
            .map(|a| a.fingerprint.clone());
        match oldest {
            Some(f) => {
                self.forget(&f);
                true
            }
            None => {
                *full = true;
                false
            }
        }
    }

    /// Applies one evaluation at `at` (ns): `obs` are the groups whose
    /// condition holds; `inhibited` tells whether an alert is silenced, given
    /// the firing budget alerts' (field, value) after this step. Returns the
    /// events to notify, each with its channels.
    pub fn step(
        &mut self,
        rules: &[Rule],
        obs: &[Observation],
        at: i64,
        cfg: &StateConfig,
        inhibited: &mut Inhibits<'_>,
    ) -> Vec<(Vec<String>, AlertEvent)> {
        let now = rfc3339_of_ns(at);
        let mut seen = BTreeSet::new();
        let mut full = false;
        for o in obs {
            let Some(rule) = rules.get(o.rule) else {
                continue;
            };
            let fp = fingerprint(&rule.name, rule.group_field, &o.group, &o.extra);
            seen.insert(fp.clone());
            let active = self
                .alerts
                .get(&fp)
                .is_some_and(|a| a.state != AlertState::Resolved);
            if !active {
                if !self.alerts.contains_key(&fp) && !self.room(cfg.max_alerts, &mut full) {
                    self.untracked += 1;
                    seen.remove(&fp);
                    continue;
                }
                self.alerts
                    .insert(fp.clone(), new_alert(rule, o, &fp, at, &now, cfg));
            }
            let Some(a) = self.alerts.get_mut(&fp) else {
                continue;
            };
            fill(a, rule, o, cfg);
            let mut changed = !active;
            if a.state == AlertState::Pending && at.saturating_sub(a.since_ns) >= ns(rule.for_) {
                a.state = AlertState::Firing;
                a.fired_at = Some(now.clone());
                a.updated_at = now.clone();
                a.updated_ns = at;
                changed = true;
            }
            // Values change every window: written with state changes, and
            // at most every VALUE_REFRESH otherwise (for /v1/alerts).
            if changed || at.saturating_sub(a.saved_ns) >= ns(VALUE_REFRESH) {
                a.saved_ns = at;
                self.dirty.insert(fp);
            }
        }
        // Alerts whose condition no longer holds (or whose rule is gone).
        let gone: Vec<String> = self
            .alerts
            .values()
            .filter(|a| a.state != AlertState::Resolved && !seen.contains(&a.fingerprint))
            .map(|a| a.fingerprint.clone())
            .collect();
        let mut events = Vec::new();
        for f in gone {
            let Some(a) = self.alerts.get_mut(&f) else {
                continue;
            };
            if a.state == AlertState::Pending {
                self.forget(&f);
                continue;
            }
            a.state = AlertState::Resolved;
            a.ends_at = Some(now.clone());
            a.updated_at = now.clone();
            a.updated_ns = at;
            if a.notified {
                events.push((a.channels.clone(), event(a, &now, None, cfg)));
            }
            self.touch(&f);
        }
        // Inhibition, from the budget alerts firing now.
        let parents: Vec<(String, String)> = self
            .alerts
            .values()
            .filter(|a| a.kind == Kind::Budget.name() && a.state == AlertState::Firing)
            .map(|a| (a.group_field.clone(), a.group.clone()))
            .collect();
        let fps: Vec<String> = self.alerts.keys().cloned().collect();
        for f in fps {
            let Some(a) = self.alerts.get_mut(&f) else {
                continue;
            };
            if a.state == AlertState::Resolved {
                continue;
            }
            let silenced = (a.kind == Kind::Threshold.name() || a.kind == Kind::Anomaly.name())
                && !parents.is_empty()
                && inhibited(a, &parents);
            if silenced != a.inhibited {
                a.inhibited = silenced;
                self.dirty.insert(f.clone());
            }
            if a.state != AlertState::Firing || a.inhibited {
                continue;
            }
            let due = !a.notified || at.saturating_sub(a.last_sent_ns) >= ns(cfg.repeat_interval);
            if !due {
                continue;
            }
            if a.notified {
                a.repeat += 1;
            }
            a.notified = true;
            a.last_sent_ns = at;
            let until = rfc3339_of_ns(at.saturating_add(ns(cfg.repeat_interval).saturating_mul(2)));
            events.push((a.channels.clone(), event(a, &now, Some(until), cfg)));
            self.dirty.insert(f);
        }
        // Forget resolved alerts past keep_resolved.
        let old: Vec<String> = self
            .alerts
            .values()
            .filter(|a| {
                a.state == AlertState::Resolved
                    && at.saturating_sub(a.updated_ns) > ns(cfg.keep_resolved)
            })
            .map(|a| a.fingerprint.clone())
            .collect();
        for f in old {
            self.forget(&f);
        }
        events
    }
}

/// `pending`, `firing` or `resolved`.
pub fn state_name(s: AlertState) -> &'static str {
    match s {
        AlertState::Pending => "pending",
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    }
}

fn new_alert(
    rule: &Rule,
    o: &Observation,
    fp: &str,
    at: i64,
    now: &str,
    cfg: &StateConfig,
) -> AlertStatus {
    AlertStatus {
        fingerprint: fp.to_string(),
        rule: rule.name.clone(),
        kind: rule.kind.name().into(),
        state: AlertState::Pending,
        inhibited: false,
        group_field: rule.group_field.into(),
        group: o.group.clone(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        value: String::new(),
        threshold: String::new(),
        starts_at: now.to_string(),
        fired_at: None,
        ends_at: None,
        updated_at: now.to_string(),
        channels: if rule.channels.is_empty() {
            cfg.all_channels.clone()
        } else {
            rule.channels.clone()
        },
        notified: false,
        repeat: 0,
        last_sent_ns: 0,
        since_ns: at,
        updated_ns: at,
        saved_ns: at,
    }
}

/// Labels, annotations and values from this observation.
fn fill(a: &mut AlertStatus, rule: &Rule, o: &Observation, cfg: &StateConfig) {
    let mut labels = rule.labels.clone();
    labels.insert("alertname".into(), rule.name.clone());
    labels.insert(rule.group_field.into(), o.group.clone());
    labels.insert("node".into(), cfg.node.clone());
    labels.extend(o.extra.clone());
    let value = o.value.normalize().to_string();
    let threshold = o.threshold.normalize().to_string();
    let mut vars: BTreeMap<&str, String> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    vars.insert("group", o.group.clone());
    vars.insert("value", value.clone());
    vars.insert("threshold", threshold.clone());
    vars.insert("rule", rule.name.clone());
    for (k, v) in &o.vars {
        vars.insert(k.as_str(), v.clone());
    }
    a.annotations = rule
        .annotations
        .iter()
        .map(|(k, t)| (k.clone(), render(t, &vars)))
        .collect();
    a.labels = labels;
    a.value = value;
    a.threshold = threshold;
}

fn event(a: &AlertStatus, now: &str, valid_until: Option<String>, cfg: &StateConfig) -> AlertEvent {
    AlertEvent {
        rule: a.rule.clone(),
        kind: a.kind.clone(),
        fingerprint: a.fingerprint.clone(),
        state: a.state,
        labels: a.labels.clone(),
        annotations: a.annotations.clone(),
        value: a.value.clone(),
        threshold: a.threshold.clone(),
        starts_at: a.starts_at.clone(),
        ends_at: a.ends_at.clone(),
        at: now.to_string(),
        node: cfg.node.clone(),
        repeat: a.repeat,
        valid_until,
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
