//! Measures: what each rule sees in the ledger at one evaluated instant.
//!
//! In: rules and the end of the newest committed window (`at`). Out: one
//! [`Observation`] per (rule, group) whose condition holds at `at`. Every
//! sum comes from [`Ledger::totals`] (exact decimals, raw records and hourly
//! rollups alike, grouped and filtered as `/v1/usage` does); one evaluation
//! asks each distinct (filters, grouping, range) once, however many rules
//! share it.
//!
//! A window `[at - W, at)` holds the records whose window *starts* in it
//! (the ledger's range rule). Rates divide the window's total by its length
//! (`per_second`: by W in seconds, `per_hour`: in hours).
//!
//! Anomaly: a run's value x against the other runs of its flow in the
//! lookback (at least `min_history`): the robust z-score
//! `z = 0.6745 · (x − median) / MAD`, MAD the median absolute deviation
//! (Iglewicz and Hoaglin's modified z-score). When MAD = 0 (over half the
//! runs cost the same) it falls back to the mean absolute deviation MeanAD:
//! `z = (x − median) / (1.253314 · MeanAD)`; when that is 0 too, every run
//! costs the same, and a run above them is anomalous (z = +∞) and one equal
//! is not (z = 0). Only runs with records in the last `idle` are judged:
//! a run that ended resolves.

use std::{
    collections::{BTreeMap, HashMap},
    rc::Rc,
    time::Duration,
};

use rust_decimal::{Decimal, prelude::ToPrimitive};

use super::rules::{Aggregate, Kind, Rule, Window, measure_of};
use crate::{
    ledger::{Group, Ledger, LedgerError, Totals, alerts::month_of},
    probes::clock::rfc3339_of_ns,
};

/// A rule's condition holding for one group at `at`.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Index of the rule in the rules evaluated.
    pub rule: usize,
    /// The group's value (`run_id`'s value, ...).
    pub group: String,
    /// Labels that tell this alert from the rule's others (budget: `percent`).
    pub extra: BTreeMap<String, String>,
    /// The measured value.
    pub value: Decimal,
    /// What it was compared with.
    pub threshold: Decimal,
    /// Template variables besides the standard ones (budget: `forecast`).
    pub vars: BTreeMap<String, String>,
}

type Key = (Vec<(String, String)>, Vec<&'static str>, i64, i64);

/// Identity → group key, per group-by fields, kept across evaluations
/// (identities never change; see [`Ledger::totals_keyed`]).
#[derive(Debug, Default)]
pub struct GroupKeys {
    by_fields: HashMap<Vec<&'static str>, HashMap<i64, Group>>,
    entries: usize,
    started_ns: i64,
}

impl GroupKeys {
    /// Most identities remembered; past it (or an hour on) the cache starts
    /// afresh, so identities deleted by expiry are not remembered for long.
    const MAX: usize = 200_000;

    fn for_fields(&mut self, fields: &[&'static str], at: i64) -> &mut HashMap<i64, Group> {
        if self.entries > Self::MAX || at.saturating_sub(self.started_ns) > 3_600_000_000_000 {
            self.by_fields.clear();
            self.entries = 0;
            self.started_ns = at;
        }
        self.by_fields.entry(fields.to_vec()).or_default()
    }
}

/// Sums from one ledger at one instant, each distinct query asked once.
pub struct Measurer<'a> {
    ledger: &'a Ledger,
    cache: HashMap<Key, Rc<Vec<(Group, Totals)>>>,
    keys: Option<&'a mut GroupKeys>,
    /// Distinct ledger queries asked.
    pub queries: usize,
}

impl<'a> Measurer<'a> {
    /// Over `ledger`.
    pub fn new(ledger: &'a Ledger) -> Self {
        Self {
            ledger,
            cache: HashMap::new(),
            keys: None,
            queries: 0,
        }
    }

    /// Over `ledger`, remembering group keys in `keys` (kept by the caller across evaluations).
    pub fn with_keys(ledger: &'a Ledger, keys: &'a mut GroupKeys) -> Self {
        Self {
            keys: Some(keys),
            ..Self::new(ledger)
        }
    }

    fn totals(
        &mut self,
        filters: &[(String, String)],
        group: &[&'static str],
        from: i64,
        to: i64,
    ) -> Result<Rc<Vec<(Group, Totals)>>, LedgerError> {
        let key = (filters.to_vec(), group.to_vec(), from, to);
        if let Some(v) = self.cache.get(&key) {
            return Ok(v.clone());
        }
        self.queries += 1;
        let (f, t) = (rfc3339_of_ns(from), rfc3339_of_ns(to));
        let rows = Rc::new(match self.keys.as_deref_mut() {
            Some(k) => {
                let before = k.for_fields(group, to).len();
                let map = k.for_fields(group, to);
                let rows = self.ledger.totals_keyed(&f, &t, group, filters, map)?;
                let added = map.len().saturating_sub(before);
                k.entries += added;
                rows
            }
            None => self.ledger.totals(&f, &t, group, filters)?,
        });
        self.cache.insert(key, rows.clone());
        Ok(rows)
    }

    /// The groups with records in `[to - d, to)` (for `idle`).
    fn active(
        &mut self,
        rule: &Rule,
        d: Duration,
        to: i64,
    ) -> Result<std::collections::HashSet<String>, LedgerError> {
        let rows = self.totals(&rule.filters, &[rule.group_field], to - ns(d), to)?;
        Ok(rows
            .iter()
            .filter_map(|(g, _)| g.first().cloned().flatten())
            .collect())
    }

    /// What rule `i` sees at `at` (ns): the groups whose condition holds.
    pub fn observe(
        &mut self,
        i: usize,
        rule: &Rule,
        at: i64,
    ) -> Result<Vec<Observation>, LedgerError> {
        match rule.kind {
            Kind::Threshold => self.threshold(i, rule, at),
            Kind::Budget => self.budget(i, rule, at),
            Kind::Anomaly => self.anomaly(i, rule, at),
            Kind::Waste => self.waste(i, rule, at),
        }
    }

    fn threshold(&mut self, i: usize, r: &Rule, at: i64) -> Result<Vec<Observation>, LedgerError> {
        let (from, active) = match r.window {
            Window::Last(w) => (at - ns(w), None),
            Window::Lifetime => (at - ns(r.lookback), Some(self.active(r, r.idle, at)?)),
        };
        let rows = self.totals(&r.filters, &[r.group_field], from, at)?;
        let mut out = Vec::new();
        for (g, t) in rows.iter() {
            let Some(Some(group)) = g.first() else {
                continue;
            };
            if active.as_ref().is_some_and(|a| !a.contains(group)) {
                continue;
            }
            let total = measure_of(t, r.measure);
            let value = match (r.window, r.aggregate) {
                (Window::Last(w), Aggregate::PerSecond) => rate(total, w, 1),
                (Window::Last(w), Aggregate::PerHour) => rate(total, w, 3600),
                _ => Some(total),
            };
            let Some(value) = value else { continue };
            if r.op.holds(value, r.value) {
                out.push(obs(i, group, value, r.value));
            }
        }
        Ok(out)
    }

    fn budget(&mut self, i: usize, r: &Rule, at: i64) -> Result<Vec<Observation>, LedgerError> {
        let Some((start, next)) = month_of(at) else {
            return Ok(Vec::new());
        };
        let rows = self.totals(&r.filters, &[r.group_field], start, at)?;
        let mut out = Vec::new();
        for (g, t) in rows.iter() {
            let Some(Some(group)) = g.first() else {
                continue;
            };
            let spend = t.cost.total;
            let forecast = forecast(spend, r.budget, start, at, next);
            for p in &r.percents {
                let th = r.budget * Decimal::from(*p) / Decimal::ONE_HUNDRED;
                if spend >= th {
                    let mut o = obs(i, group, spend, th);
                    o.extra.insert("percent".into(), p.to_string());
                    o.vars.insert("forecast".into(), forecast.clone());
                    o.vars.insert("percent".into(), p.to_string());
                    out.push(o);
                }
            }
        }
        Ok(out)
    }

    fn anomaly(&mut self, i: usize, r: &Rule, at: i64) -> Result<Vec<Observation>, LedgerError> {
        let active = self.active(r, r.idle, at)?;
        if active.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.totals(&r.filters, &["flow_id", "run_id"], at - ns(r.lookback), at)?;
        let mut flows: HashMap<&str, Vec<(&str, Decimal)>> = HashMap::new();
        for (g, t) in rows.iter() {
            if let [Some(flow), Some(run)] = g.as_slice() {
                flows
                    .entry(flow.as_str())
                    .or_default()
                    .push((run.as_str(), measure_of(t, r.measure)));
            }
        }
        let mut out = Vec::new();
        for runs in flows.values() {
            for (run, x) in runs {
                if !active.contains(*run) || runs.len() - 1 < r.min_history {
                    continue;
                }
                let history: Vec<Decimal> = runs
                    .iter()
                    .filter(|(other, _)| other != run)
                    .map(|(_, v)| *v)
                    .collect();
                let s = robust_z(*x, &history);
                if s.z >= r.z {
                    let mut o = obs(i, run, *x, s.bound(r.z));
                    o.vars.insert("median".into(), s.median.to_string());
                    o.vars.insert("z".into(), s.z.round_dp(3).to_string());
                    out.push(o);
                }
            }
        }
        Ok(out)
    }

    fn waste(&mut self, i: usize, r: &Rule, at: i64) -> Result<Vec<Observation>, LedgerError> {
        let Window::Last(w) = r.window else {
            return Ok(Vec::new());
        };
        let rows = self.totals(&r.filters, &[r.group_field], at - ns(w), at)?;
        let mut out = Vec::new();
        for (g, t) in rows.iter() {
            let Some(Some(group)) = g.first() else {
                continue;
            };
            let (Some(held), Some(busy)) = (
                rate(t.gpu_memory_gb_seconds, w, 1),
                rate(t.gpu_seconds, w, 1),
            ) else {
                continue;
            };
            if held >= r.value && busy <= r.max_gpu_busy {
                let mut o = obs(i, group, held, r.value);
                o.vars
                    .insert("gpu_busy".into(), busy.round_dp(6).to_string());
                out.push(o);
            }
        }
        Ok(out)
    }
}

fn obs(i: usize, group: &str, value: Decimal, threshold: Decimal) -> Observation {
    Observation {
        rule: i,
        group: group.to_string(),
        extra: BTreeMap::new(),
        value,
        threshold,
        vars: BTreeMap::new(),
    }
}

/// A duration in ns (saturating).
pub fn ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// `total` per `unit_s` seconds over `w`.
fn rate(total: Decimal, w: Duration, unit_s: u32) -> Option<Decimal> {
    let secs = Decimal::from_i128_with_scale(i128::try_from(w.as_nanos()).ok()?, 9);
    total.checked_mul(Decimal::from(unit_s))?.checked_div(secs)
}

/// When spend crosses the budget at its month-to-date average rate: a
/// straight line from the month's start through (at, spend).
pub fn forecast(spend: Decimal, budget: Decimal, start: i64, at: i64, next: i64) -> String {
    if spend >= budget {
        return "reached".into();
    }
    let elapsed = Decimal::from(at - start);
    if spend <= Decimal::ZERO || elapsed <= Decimal::ZERO {
        return "not this month".into();
    }
    // t = start + budget / (spend / elapsed)
    let Some(cross) = budget
        .checked_mul(elapsed)
        .and_then(|x| x.checked_div(spend))
        .and_then(|d| d.trunc().to_i64())
        .and_then(|d| start.checked_add(d))
    else {
        return "not this month".into();
    };
    if cross >= next {
        "not this month".into()
    } else {
        rfc3339_of_ns(cross)
    }
}

/// A robust z-score and what it was computed from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Robust {
    /// The history's median.
    pub median: Decimal,
    /// The scale: MAD / 0.6745, or 1.253314 · MeanAD where MAD = 0 (0: none).
    pub scale: Decimal,
    /// The score (Decimal::MAX for +∞).
    pub z: Decimal,
}

impl Robust {
    /// The value at which the score reaches `z`.
    pub fn bound(&self, z: Decimal) -> Decimal {
        self.scale
            .checked_mul(z)
            .and_then(|d| d.checked_add(self.median))
            .unwrap_or(self.median)
    }
}

fn median(v: &mut [Decimal]) -> Decimal {
    v.sort();
    let n = v.len();
    if n == 0 {
        return Decimal::ZERO;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / Decimal::TWO
    }
}

/// The robust z-score of `x` against `history` (see the module doc).
pub fn robust_z(x: Decimal, history: &[Decimal]) -> Robust {
    let mut h = history.to_vec();
    let m = median(&mut h);
    let mut dev: Vec<Decimal> = h.iter().map(|v| (*v - m).abs()).collect();
    let mad = median(&mut dev);
    let scale = if mad > Decimal::ZERO {
        mad / Decimal::new(6745, 4)
    } else {
        let n = Decimal::from(dev.len().max(1));
        let mean_ad = dev.iter().copied().sum::<Decimal>() / n;
        mean_ad * Decimal::new(1_253_314, 6)
    };
    let z = if scale > Decimal::ZERO {
        (x - m).checked_div(scale).unwrap_or(Decimal::MAX)
    } else if x > m {
        Decimal::MAX
    } else {
        Decimal::ZERO
    };
    Robust {
        median: m,
        scale,
        z,
    }
}

#[cfg(test)]
#[path = "eval_tests.rs"]
mod tests;
