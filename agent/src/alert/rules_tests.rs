use super::*;

fn err(text: &str) -> String {
    match parse_text(text, "alerts.toml") {
        Ok(r) => panic!("accepted: {r:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_rule_of_each_kind_parses_with_its_defaults() {
    let rules = parse_text(
        r#"
[[alerts]]
name = "run-cost"
where = { customer_id = "acme" }
measure = "cost_total"
value = "5"
labels = { severity = "page" }
annotations = { summary = "run {{ group }} cost {{ value }} > {{ threshold }} ({{ severity }}, {{ run_id }})" }

[[alerts]]
name = "agent-cpu"
group = "agent"
measure = "cpu_core_seconds"
window = "1m"
as = "per_second"
value = 2
for = "5m"

[[alerts]]
name = "acme-budget"
kind = "budget"
group = "customer"
budget = "1000.50"
percents = [50, 80, 100]
annotations = { summary = "{{ group }} at {{ percent }} %, crosses 100 % at {{ forecast }}" }

[[alerts]]
name = "odd-run"
kind = "anomaly"
z = "3"

[[alerts]]
name = "idle-gpu"
kind = "waste"
value = "2"
"#,
        "alerts.toml",
    )
    .expect("parses");
    assert_eq!(rules.len(), 5);
    let r = &rules[0];
    assert_eq!(
        (r.kind, r.group_field, r.measure),
        (Kind::Threshold, "run_id", 0)
    );
    assert_eq!(r.window, Window::Last(Duration::from_secs(300)));
    assert_eq!(r.value, Decimal::from(5));
    assert_eq!(r.filters, vec![("customer_id".into(), "acme".into())]);
    assert_eq!(r.origin, "alerts.toml:2");
    assert_eq!(rules[1].aggregate, Aggregate::PerSecond);
    assert_eq!(rules[1].for_, Duration::from_secs(300));
    assert_eq!(rules[2].budget, Decimal::from_str("1000.50").expect("d"));
    assert_eq!(rules[3].group_field, "run_id");
    assert_eq!(rules[3].z, Decimal::from(3));
    assert_eq!(rules[4].group_field, "container_id");
    assert_eq!(rules[4].max_gpu_busy, Decimal::new(5, 2));
}

#[test]
fn errors_name_the_file_the_line_and_what_is_wrong() {
    // A bad measure on the rule at line 5.
    let e = err(
        "# rules\n\n[[alerts]]\nname = \"a\"\nvalue = \"1\"\n\n[[alerts]]\nname = \"b\"\nmeasure = \"bogus\"\nvalue = \"1\"\n",
    );
    assert!(
        e.starts_with("alerts.toml:7: alert rule \"b\": measure \"bogus\""),
        "{e}"
    );
    // An unknown key: toml's own span.
    let e = err("[[alerts]]\nname = \"a\"\nvalue = \"1\"\nthreshold = 3\n");
    assert!(e.starts_with("alerts.toml:4:"), "{e}");
    assert!(e.contains("unknown field `threshold`"), "{e}");
    // Not TOML at all.
    let e = err("[[alerts]\nname = \"a\"\n");
    assert!(e.starts_with("alerts.toml:1:"), "{e}");
    // A float where money is meant.
    let e = err("[[alerts]]\nname = \"a\"\nvalue = 5.1\n");
    assert!(
        e.contains("float") && e.starts_with("alerts.toml:3:"),
        "{e}"
    );
    // An unknown placeholder.
    let e = err(
        "[[alerts]]\nname = \"a\"\nvalue = \"1\"\nannotations = { summary = \"{{ customer }}\" }\n",
    );
    assert!(e.contains("unknown placeholder {{ customer }}"), "{e}");
    // A duplicate name.
    let e =
        err("[[alerts]]\nname = \"a\"\nvalue = \"1\"\n[[alerts]]\nname = \"a\"\nvalue = \"2\"\n");
    assert!(
        e.starts_with("alerts.toml:4: alert rule \"a\": the name is used"),
        "{e}"
    );
    for (text, want) in [
        (
            "kind = \"budget\"\ngroup = \"run\"\nbudget = \"1\"",
            "per customer or project",
        ),
        ("kind = \"budget\"", "needs `budget`"),
        ("kind = \"anomaly\"\ngroup = \"flow\"", "group must be run"),
        ("group = \"pod\"\nvalue = \"1\"", "group \"pod\""),
        (
            "value = \"1\"\nwhere = { nope = \"x\" }",
            "unknown field \"nope\"",
        ),
        ("value = \"1\"\nop = \"=>\"", "op \"=>\""),
        (
            "value = \"1\"\nwindow = \"lifetime\"\nas = \"per_hour\"",
            "a rate needs",
        ),
        ("value = \"1\"\nfor = \"soon\"", "for = \"soon\""),
        ("", "needs `value`"),
        (
            "value = \"1\"\nlabels = { alertname = \"x\" }",
            "set by the agent",
        ),
        (
            "value = \"1\"\nannotations = { s = \"{{ value \" }",
            "not closed",
        ),
    ] {
        let e = err(&format!("[[alerts]]\nname = \"r\"\n{text}\n"));
        assert!(e.starts_with("alerts.toml:1: alert rule \"r\": "), "{e}");
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn merged_rules_keep_names_unique_and_channels_can_be_checked() {
    let a = parse_text("[[alerts]]\nname = \"x\"\nvalue = \"1\"\n", "config.toml").expect("a");
    let b = parse_text(
        "\n[[alerts]]\nname = \"x\"\nvalue = \"1\"\nchannels = [\"ops\"]\n",
        "rules.toml",
    )
    .expect("b");
    let e = merge(a.clone(), b.clone())
        .expect_err("duplicate")
        .to_string();
    assert!(
        e.starts_with(
            "rules.toml:2: alert rule \"x\": the name is used by the rule at config.toml:1"
        ),
        "{e}"
    );
    let e = check_channels(&b, &["slack".into()])
        .expect_err("unknown channel")
        .to_string();
    assert!(e.contains("channel \"ops\" is not configured"), "{e}");
    check_channels(&b, &["ops".into()]).expect("known");
}

#[test]
fn templates_render_every_placeholder() {
    let vars: BTreeMap<&str, String> =
        [("group", "r1".to_string()), ("value", "5.5".into())].into();
    assert_eq!(
        render("run {{group}} cost {{ value }}!", &vars),
        "run r1 cost 5.5!"
    );
}

#[test]
fn the_daemon_config_refuses_a_bad_rule_with_its_line() {
    let dir = std::env::temp_dir().join(format!("mentat-rules-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join("agent.toml");
    std::fs::write(
        &p,
        "tick = \"1s\"\n\n[[alerts]]\nname = \"a\"\nmeasure = \"cost\"\nvalue = \"1\"\n",
    )
    .expect("write");
    let e = crate::config::Config::load(&p)
        .expect_err("bad rule")
        .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        e.contains("agent.toml:3: alert rule \"a\": measure \"cost\""),
        "{e}"
    );
}

#[test]
fn the_readme_alert_example_parses() {
    let readme = include_str!("../../../README.md");
    let block = readme
        .split("```toml\n")
        .find(|b| b.starts_with("[[alerts]]"))
        .and_then(|b| b.split("```").next())
        .expect("README has a ```toml block starting with [[alerts]]");
    let rules = parse_text(block, "README.md").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rules[0].name, "run-cost");
}
