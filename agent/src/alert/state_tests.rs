use std::sync::{Arc, Mutex};

use super::*;
use crate::alert::{
    engine::{AlertSink, AlertStats, Engine, RulesHandle},
    eval::Observation,
    rules::{AlertingConfig, parse_text},
    testutil::{R, S, T0, Temp, commit, d},
};

fn cfg() -> StateConfig {
    StateConfig {
        node: "n1".into(),
        repeat_interval: Duration::from_secs(60),
        keep_resolved: Duration::from_secs(3600),
        max_alerts: 100,
        all_channels: vec!["ops".into()],
    }
}

fn holds(group: &str, value: &str) -> Observation {
    Observation {
        rule: 0,
        group: group.into(),
        extra: BTreeMap::new(),
        value: d(value),
        threshold: d("5"),
        vars: BTreeMap::new(),
    }
}

fn rules(text: &str) -> Vec<Rule> {
    parse_text(text, "t.toml").expect("rules")
}

fn never(_: &AlertStatus, _: &[(String, String)]) -> bool {
    false
}

#[test]
fn pending_fires_after_for_and_resolves_once() {
    let r = rules(
        "[[alerts]]\nname = \"cost\"\nvalue = \"5\"\nfor = \"10s\"\nlabels = { severity = \"page\" }\nannotations = { summary = \"run {{ group }}: {{ value }} > {{ threshold }} ({{ severity }})\" }\n",
    );
    let mut t = StateTable::default();
    let c = cfg();
    assert!(
        t.step(&r, &[holds("r1", "6")], T0, &c, &mut never)
            .is_empty()
    );
    let a = t.alerts.values().next().expect("tracked");
    assert_eq!(a.state, AlertState::Pending);
    assert!(
        t.step(&r, &[holds("r1", "7")], T0 + 5 * S, &c, &mut never)
            .is_empty()
    );
    let ev = t.step(&r, &[holds("r1", "8")], T0 + 10 * S, &c, &mut never);
    assert_eq!(ev.len(), 1);
    let (chans, e) = &ev[0];
    assert_eq!(chans, &["ops".to_string()]);
    assert_eq!(e.state, AlertState::Firing);
    assert_eq!(e.repeat, 0);
    assert_eq!(e.value, "8");
    assert_eq!(e.starts_at, rfc3339_of_ns(T0));
    assert_eq!(
        e.valid_until.as_deref(),
        Some(rfc3339_of_ns(T0 + 130 * S).as_str())
    );
    assert_eq!(e.labels["alertname"], "cost");
    assert_eq!(e.labels["run_id"], "r1");
    assert_eq!(e.labels["severity"], "page");
    assert_eq!(e.labels["node"], "n1");
    assert_eq!(e.annotations["summary"], "run r1: 8 > 5 (page)");
    assert!(
        t.step(&r, &[holds("r1", "8")], T0 + 11 * S, &c, &mut never)
            .is_empty()
    );
    let ev = t.step(&r, &[], T0 + 12 * S, &c, &mut never);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].1.state, AlertState::Resolved);
    assert_eq!(
        ev[0].1.ends_at.as_deref(),
        Some(rfc3339_of_ns(T0 + 12 * S).as_str())
    );
    assert_eq!(ev[0].1.starts_at, rfc3339_of_ns(T0));
    assert!(t.step(&r, &[], T0 + 13 * S, &c, &mut never).is_empty());
    // A pending alert whose condition stops is forgotten, never notified.
    t.step(&r, &[holds("r2", "6")], T0 + 20 * S, &c, &mut never);
    assert!(t.step(&r, &[], T0 + 21 * S, &c, &mut never).is_empty());
    assert!(t.alerts.values().all(|a| a.group != "r2"));
}

#[test]
fn a_firing_alert_repeats_every_interval_counting_repeats() {
    let r = rules("[[alerts]]\nname = \"cost\"\nvalue = \"5\"\n");
    let mut t = StateTable::default();
    let c = cfg();
    let mut sent = Vec::new();
    for s in 0..=130 {
        for (_, e) in t.step(&r, &[holds("r1", "6")], T0 + s * S, &c, &mut never) {
            sent.push((s, e.repeat));
        }
    }
    assert_eq!(sent, vec![(0, 0), (60, 1), (120, 2)]);
}

#[test]
fn new_alerts_past_the_bound_are_counted_not_tracked() {
    let r = rules("[[alerts]]\nname = \"cost\"\nvalue = \"5\"\n");
    let mut t = StateTable::default();
    let c = StateConfig {
        max_alerts: 1,
        ..cfg()
    };
    let ev = t.step(
        &r,
        &[holds("r1", "6"), holds("r2", "6")],
        T0,
        &c,
        &mut never,
    );
    assert_eq!(ev.len(), 1);
    assert_eq!((t.alerts.len(), t.untracked), (1, 1));
}

/// A sink that keeps what it is given.
#[derive(Clone, Default)]
struct Kept(Arc<Mutex<Vec<(String, AlertEvent)>>>);

impl AlertSink for Kept {
    fn enqueue(
        &mut self,
        _ledger: &mut crate::ledger::Ledger,
        items: &[(String, AlertEvent)],
    ) -> Result<usize, String> {
        let mut v = self.0.lock().map_err(|e| e.to_string())?;
        v.extend_from_slice(items);
        Ok(items.len())
    }
}

impl Kept {
    fn take(&self) -> Vec<(String, AlertState, u32)> {
        let mut v = self.0.lock().expect("lock");
        v.drain(..)
            .map(|(c, e)| {
                (
                    e.labels
                        .get("run_id")
                        .or(e.labels.get("customer_id"))
                        .cloned()
                        .unwrap_or(c),
                    e.state,
                    e.repeat,
                )
            })
            .collect()
    }
}

fn engine(t: &Temp, rules_text: &str, sink: &Kept) -> (Engine, RulesHandle) {
    let file = t.0.join("rules.toml");
    std::fs::write(&file, rules_text).expect("write rules");
    let handle = RulesHandle::load(
        &[],
        Some(&file),
        Vec::new(),
        Arc::new(AlertStats::default()),
    )
    .expect("rules");
    let alerting = AlertingConfig {
        repeat_interval: Duration::from_secs(60),
        ..AlertingConfig::default()
    };
    let e = Engine::open(
        &t.db(),
        handle.clone(),
        &alerting,
        "n1",
        vec!["ops".into()],
        Box::new(sink.clone()),
    )
    .expect("engine");
    (e, handle)
}

fn cust<'a>(run: &'a str, customer: &'a str, cost: &'a str) -> R<'a> {
    R {
        run: Some(run),
        customer: Some(customer),
        cost,
        ..R::default()
    }
}

const RUN_COST: &str = "[[alerts]]\nname = \"cost\"\nvalue = \"5\"\nwindow = \"1m\"\n";

#[test]
fn a_restart_neither_loses_a_firing_alert_nor_announces_it_again() {
    let t = Temp::new("restart");
    let mut l = t.ledger();
    commit(
        &mut l,
        T0,
        &[cust("r1", "acme", "6"), cust("r2", "acme", "1")],
    );
    let sink = Kept::default();
    let (mut e, _) = engine(&t, RUN_COST, &sink);
    e.evaluate(T0 + S).expect("evaluate");
    assert_eq!(sink.take(), vec![("r1".into(), AlertState::Firing, 0)]);
    drop(e);
    // Restarted: still firing, not announced again before the repeat is due.
    let (mut e, _) = engine(&t, RUN_COST, &sink);
    assert_eq!(
        e.alerts().filter(|a| a.state == AlertState::Firing).count(),
        1
    );
    commit(&mut l, T0 + 30 * S, &[cust("r1", "acme", "6")]);
    e.evaluate(T0 + 31 * S).expect("evaluate");
    assert!(sink.take().is_empty());
    e.evaluate(T0 + 61 * S).expect("evaluate");
    assert_eq!(sink.take(), vec![("r1".into(), AlertState::Firing, 1)]);
    drop(e);
    // And after another restart, it resolves once when the condition stops.
    let (mut e, _) = engine(&t, RUN_COST, &sink);
    e.evaluate(T0 + 100 * S).expect("evaluate");
    assert_eq!(sink.take(), vec![("r1".into(), AlertState::Resolved, 1)]);
    e.evaluate(T0 + 101 * S).expect("evaluate");
    assert!(sink.take().is_empty());
    // The API's view: the ledger's rows.
    let bodies = l
        .alert_list(Some("resolved"), Some("cost"), 10)
        .expect("list");
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].contains("\"run_id\":\"r1\""), "{}", bodies[0]);
}

#[test]
fn a_firing_budget_silences_its_customers_runs_only() {
    let t = Temp::new("inhibit");
    let mut l = t.ledger();
    commit(
        &mut l,
        T0,
        &[cust("r1", "acme", "60"), cust("r2", "globex", "10")],
    );
    let text = format!(
        "{RUN_COST}\n[[alerts]]\nname = \"acme-budget\"\nkind = \"budget\"\nbudget = \"100\"\npercents = [50]\nwhere = {{ customer_id = \"acme\" }}\n"
    );
    let sink = Kept::default();
    let (mut e, handle) = engine(&t, &text, &sink);
    e.evaluate(T0 + S).expect("evaluate");
    let mut got = sink.take();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("acme".into(), AlertState::Firing, 0),
            ("r2".into(), AlertState::Firing, 0)
        ]
    );
    let r1 = e.alerts().find(|a| a.group == "r1").expect("r1 tracked");
    assert_eq!((r1.state, r1.inhibited), (AlertState::Firing, true));
    // Without the budget rule (removed by a reload), the budget alert
    // resolves and r1 is no longer silenced: it is announced.
    std::fs::write(t.0.join("rules.toml"), RUN_COST).expect("write");
    handle.reload().expect("reload");
    e.evaluate(T0 + 2 * S).expect("evaluate");
    let mut got = sink.take();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("acme".into(), AlertState::Resolved, 0),
            ("r1".into(), AlertState::Firing, 0)
        ]
    );
}

#[test]
fn a_bad_rules_file_on_reload_keeps_the_old_rules() {
    let t = Temp::new("reload");
    let mut l = t.ledger();
    commit(&mut l, T0, &[cust("r1", "acme", "6")]);
    let sink = Kept::default();
    let (mut e, handle) = engine(&t, RUN_COST, &sink);
    std::fs::write(
        t.0.join("rules.toml"),
        "[[alerts]]\nname = \"cost\"\nvalue = 5.5\n",
    )
    .expect("write");
    let err = handle.reload().expect_err("refused").to_string();
    assert!(
        err.contains("rules.toml:3:") && err.contains("float"),
        "{err}"
    );
    assert_eq!(handle.current().len(), 1);
    e.evaluate(T0 + S).expect("evaluate");
    assert_eq!(sink.take(), vec![("r1".into(), AlertState::Firing, 0)]);
    // A good file replaces them; the removed rule's alert resolves.
    std::fs::write(
        t.0.join("rules.toml"),
        "[[alerts]]\nname = \"other\"\nvalue = \"100\"\n",
    )
    .expect("write");
    assert_eq!(handle.reload().expect("reloaded"), 1);
    e.evaluate(T0 + 2 * S).expect("evaluate");
    assert_eq!(sink.take(), vec![("r1".into(), AlertState::Resolved, 0)]);
}
