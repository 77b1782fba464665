use super::*;
use crate::alert::{
    rules::parse_text,
    testutil::{R, S, T0, Temp, commit, d},
};

fn rule(text: &str) -> Rule {
    parse_text(&format!("[[alerts]]\nname = \"r\"\n{text}\n"), "t.toml")
        .expect("rule")
        .remove(0)
}

fn seen(l: &Ledger, r: &Rule, at: i64) -> Vec<(String, Decimal)> {
    let mut v: Vec<(String, Decimal)> = Measurer::new(l)
        .observe(0, r, at)
        .expect("observe")
        .into_iter()
        .map(|o| (o.group, o.value))
        .collect();
    v.sort();
    v
}

fn run<'a>(run: &'a str, cost: &'a str) -> R<'a> {
    R {
        run: Some(run),
        cost,
        ..R::default()
    }
}

#[test]
fn threshold_fires_for_the_group_over_it_exactly() {
    let t = Temp::new("threshold");
    let mut l = t.ledger();
    commit(&mut l, T0, &[run("r1", "3"), run("r2", "1")]);
    commit(&mut l, T0 + S, &[run("r1", "3"), run("r2", "0.5")]);
    // A record before the 5-minute window does not count.
    commit(&mut l, T0 - 400 * S, &[run("r2", "100")]);
    let at = T0 + 2 * S;
    assert_eq!(
        seen(&l, &rule("value = \"5\""), at),
        vec![("r1".into(), d("6"))]
    );
    // Exact decimals: 6 is not > 6, and is > 5.9999999999999999999.
    assert!(seen(&l, &rule("value = \"6\""), at).is_empty());
    assert_eq!(
        seen(&l, &rule("value = \"5.9999999999999999999\""), at).len(),
        1
    );
    assert_eq!(seen(&l, &rule("value = \"6\"\nop = \">=\""), at).len(), 1);
    // The filter narrows to what it names.
    let r = rule("value = \"0\"\nwhere = { run_id = \"r2\" }");
    assert_eq!(seen(&l, &r, at), vec![("r2".into(), d("1.5"))]);
}

#[test]
fn rates_divide_by_the_window() {
    let t = Temp::new("rate");
    let mut l = t.ledger();
    let a = R {
        run: Some("r1"),
        cpu: "120",
        ..R::default()
    };
    commit(&mut l, T0, &[a]);
    let at = T0 + S;
    // 120 core-seconds in a 1-minute window: 2 cores; 7,200 per hour.
    let r = rule(
        "group = \"run\"\nmeasure = \"cpu_core_seconds\"\nwindow = \"1m\"\nas = \"per_second\"\nop = \">=\"\nvalue = 2",
    );
    assert_eq!(seen(&l, &r, at), vec![("r1".into(), d("2"))]);
    let r = rule("measure = \"cpu_core_seconds\"\nwindow = \"1m\"\nas = \"per_second\"\nvalue = 2");
    assert!(seen(&l, &r, at).is_empty());
    let r = rule(
        "measure = \"cpu_core_seconds\"\nwindow = \"1m\"\nas = \"per_hour\"\nop = \"==\"\nvalue = 7200",
    );
    assert_eq!(seen(&l, &r, at).len(), 1);
}

#[test]
fn lifetime_sums_since_the_group_began_and_ends_when_idle() {
    let t = Temp::new("lifetime");
    let mut l = t.ledger();
    commit(&mut l, T0, &[run("r1", "3")]);
    commit(&mut l, T0 + 600 * S, &[run("r1", "3")]);
    let r = rule("window = \"lifetime\"\nvalue = \"5\"\nidle = \"5m\"");
    assert_eq!(seen(&l, &r, T0 + 601 * S), vec![("r1".into(), d("6"))]);
    // Over 5 minutes without a record: the run is over, its alert resolves.
    assert!(seen(&l, &r, T0 + 1000 * S).is_empty());
}

#[test]
fn budget_fires_per_percent_with_a_forecast() {
    let t = Temp::new("budget");
    let mut l = t.ledger();
    let c = |cost| R {
        customer: Some("acme"),
        cost,
        ..R::default()
    };
    commit(&mut l, T0, &[c("60")]);
    let other = R {
        customer: Some("globex"),
        cost: "10",
        ..R::default()
    };
    commit(&mut l, T0 + S, &[other]);
    let r = rule("kind = \"budget\"\nbudget = \"100\"");
    let at = T0 + 2 * S;
    let obs = Measurer::new(&l).observe(0, &r, at).expect("observe");
    assert_eq!(obs.len(), 1, "{obs:?}");
    assert_eq!(obs[0].group, "acme");
    assert_eq!(obs[0].extra["percent"], "50");
    assert_eq!(obs[0].threshold, d("50"));
    // 60 spent in 9 days and 2 s since Jan 1: 100 at 100/60 of that,
    // 15 days 3.33 s in.
    assert!(
        obs[0].vars["forecast"].starts_with("2026-01-16T00:00:03.333"),
        "{:?}",
        obs[0].vars
    );
    commit(&mut l, T0 + 2 * S, &[c("40")]);
    let obs = Measurer::new(&l)
        .observe(0, &r, T0 + 3 * S)
        .expect("observe");
    let mut p: Vec<&str> = obs.iter().map(|o| o.extra["percent"].as_str()).collect();
    p.sort();
    assert_eq!(p, ["100", "50", "80"]);
    assert_eq!(obs[0].vars["forecast"], "reached");
}

#[test]
fn anomaly_flags_a_run_far_above_its_flows_median() {
    let t = Temp::new("anomaly");
    let mut l = t.ledger();
    let costs = [
        "1.0", "1.1", "0.9", "1.2", "0.8", "1.0", "1.05", "0.95", "1.1", "1.0",
    ];
    let names: Vec<String> = (0..costs.len()).map(|i| format!("h{i}")).collect();
    let history: Vec<R> = names
        .iter()
        .zip(costs)
        .map(|(n, c)| R {
            run: Some(n),
            flow: Some("f"),
            cost: c,
            ..R::default()
        })
        .collect();
    commit(&mut l, T0 - 3600 * S, &history);
    let now = |n: &'static str, cost: &'static str| R {
        run: Some(n),
        flow: Some("f"),
        cost,
        ..R::default()
    };
    commit(&mut l, T0, &[now("big", "10"), now("usual", "1.05")]);
    let r = rule("kind = \"anomaly\"");
    let obs = Measurer::new(&l).observe(0, &r, T0 + S).expect("observe");
    assert_eq!(obs.len(), 1, "{obs:?}");
    assert_eq!(obs[0].group, "big");
    // Too little history: nothing is judged.
    let r = rule("kind = \"anomaly\"\nmin_history = 12");
    assert!(seen(&l, &r, T0 + S).is_empty());
}

#[test]
fn robust_z_follows_the_documented_formula() {
    let h: Vec<Decimal> = (1..=9).map(Decimal::from).collect();
    let s = robust_z(Decimal::from(20), &h);
    assert_eq!(s.median, Decimal::from(5));
    // MAD = 2: z = 0.6745 × 15 / 2 = 5.05875 (to Decimal's precision).
    assert!((s.z - d("5.05875")).abs() < d("0.000000000001"), "{}", s.z);
    // MAD = 0 (all equal): above is +∞, equal is 0.
    let flat = vec![Decimal::ONE; 10];
    assert_eq!(robust_z(d("1.5"), &flat).z, Decimal::MAX);
    assert_eq!(robust_z(Decimal::ONE, &flat).z, Decimal::ZERO);
    // MAD = 0 but not all equal: the mean absolute deviation scales it.
    let mut most = vec![Decimal::ONE; 9];
    most.push(Decimal::from(3));
    let s = robust_z(Decimal::from(3), &most);
    // MeanAD = 0.2: z = 2 / (1.253314 × 0.2).
    assert_eq!(s.z, Decimal::from(2) / (d("1.253314") * d("0.2")));
}

#[test]
fn waste_is_gpu_memory_held_while_the_gpu_idles() {
    let t = Temp::new("waste");
    let mut l = t.ledger();
    let idle = R {
        container: Some("c1"),
        gpu_mem: "240",
        gpu_s: "0.6",
        ..R::default()
    };
    let busy = R {
        container: Some("c2"),
        gpu_mem: "240",
        gpu_s: "30",
        ..R::default()
    };
    commit(&mut l, T0, &[idle, busy]);
    // 240 GB-s over 1 min: 4 GB held; c1 busy 1 % of it, c2 50 %.
    let r = rule("kind = \"waste\"\nwindow = \"1m\"\nvalue = \"2\"");
    assert_eq!(seen(&l, &r, T0 + S), vec![("c1".into(), d("4"))]);
}

#[test]
fn rules_sharing_a_query_ask_the_ledger_once() {
    let t = Temp::new("share");
    let mut l = t.ledger();
    commit(&mut l, T0, &[run("r1", "3")]);
    let a = rule("value = \"1\"");
    let b = rule("value = \"2\"\nmeasure = \"cpu_core_seconds\"");
    let mut m = Measurer::new(&l);
    m.observe(0, &a, T0 + S).expect("a");
    m.observe(1, &b, T0 + S).expect("b");
    assert_eq!(m.queries, 1);
}
