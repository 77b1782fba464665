//! The outbox's invariants and the delivery loop against a scripted channel.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use super::*;
use crate::{alert::AlertState, ledger::Ledger};

fn temp_ledger(name: &str) -> (PathBuf, SharedLedger) {
    let dir = std::env::temp_dir().join(format!(
        "mentat-notify-{name}-{}-{}",
        std::process::id(),
        crate::probes::clock::unix_ns(SystemTime::now())
    ));
    let ledger = Ledger::open(&dir.join("ledger.db"), Duration::from_secs(3600)).unwrap();
    (dir, SharedLedger::new(ledger))
}

fn event(rule: &str, fp: &str, state: AlertState, repeat: u32) -> AlertEvent {
    AlertEvent {
        rule: rule.into(),
        kind: "threshold".into(),
        fingerprint: fp.into(),
        state,
        labels: BTreeMap::from([("alertname".into(), rule.into())]),
        annotations: BTreeMap::from([("summary".into(), format!("{rule} over"))]),
        value: "6".into(),
        threshold: "5".into(),
        starts_at: "2026-12-01T00:00:00Z".into(),
        ends_at: (state == AlertState::Resolved).then(|| "2026-12-01T00:05:00Z".into()),
        at: "2026-12-01T00:05:00Z".into(),
        node: "n".into(),
        repeat,
        valid_until: None,
    }
}

fn pairs(channel: &str, events: &[AlertEvent]) -> Vec<(String, AlertEvent)> {
    events
        .iter()
        .map(|e| (channel.to_string(), e.clone()))
        .collect()
}

#[test]
fn enqueue_is_idempotent_and_skips_pending() {
    let (dir, l) = temp_ledger("idem");
    let events = [
        event("r", "f1", AlertState::Firing, 0),
        event("r", "f1", AlertState::Firing, 1),
        event("r", "f1", AlertState::Resolved, 0),
        event("r", "f2", AlertState::Pending, 0),
    ];
    let mut items = pairs("a", &events);
    items.extend(pairs("b", &events[..1]));
    assert_eq!(l.lock().enqueue_alert_events(&items).unwrap(), 4);
    // Re-deciding the same events (a restart) queues nothing new.
    assert_eq!(l.lock().enqueue_alert_events(&items).unwrap(), 0);
    let due = l.lock().due_alert_rows("a", i64::MAX, 100).unwrap();
    let keys: Vec<(String, String, u32)> = due
        .iter()
        .map(|r| (r.fingerprint.clone(), r.state.clone(), r.repeat))
        .collect();
    assert_eq!(
        keys,
        [
            ("f1".into(), "firing".into(), 0),
            ("f1".into(), "firing".into(), 1),
            ("f1".into(), "resolved".into(), 0)
        ]
    );
    // Sent rows still count as queued: no re-send after a restart either.
    let ids: Vec<i64> = due.iter().map(|r| r.id).collect();
    l.lock().mark_alert_rows_sent(&ids).unwrap();
    assert_eq!(l.lock().enqueue_alert_events(&items).unwrap(), 0);
    assert_eq!(l.lock().pending_alert_count("a").unwrap(), 0);
    assert_eq!(l.lock().pending_alert_count("b").unwrap(), 1);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_deferred_row_holds_back_the_rows_behind_it_and_nothing_is_dropped() {
    let (dir, l) = temp_ledger("defer");
    let items = pairs(
        "a",
        &[
            event("r", "f1", AlertState::Firing, 0),
            event("r", "f1", AlertState::Resolved, 0),
        ],
    );
    l.lock().enqueue_alert_events(&items).unwrap();
    let now = i64::MAX / 2;
    let due = l.lock().due_alert_rows("a", now, 100).unwrap();
    assert_eq!(due.len(), 2);
    l.lock()
        .defer_alert_rows(&[due[0].id], now + 10, "HTTP 503")
        .unwrap();
    // The resolve is due, but must not overtake its firing.
    assert!(l.lock().due_alert_rows("a", now, 100).unwrap().is_empty());
    assert_eq!(l.lock().next_alert_due("a").unwrap(), Some(now + 10));
    let again = l.lock().due_alert_rows("a", now + 10, 100).unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].last_error.as_deref(), Some("HTTP 503"));
    // Refused for good: out of the queue, listed, never deleted before retention.
    l.lock()
        .dead_letter_alert_rows(&[again[0].id], "HTTP 400: bad")
        .unwrap();
    let dead = l.lock().dead_alert_rows(Some("a"), 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("HTTP 400: bad"));
    l.lock().mark_alert_rows_sent(&[again[1].id]).unwrap();
    let counts = l.lock().alert_outbox_counts("a").unwrap();
    assert_eq!((counts.pending, counts.sent, counts.dead), (0, 1, 1));
    // Expiry keeps them within the retention, deletes them past it.
    let now_text = crate::probes::clock::rfc3339(SystemTime::now());
    let kept = l
        .lock()
        .expire(&now_text, Duration::from_secs(3600))
        .unwrap();
    assert_eq!(kept.alert_notifications, 0);
    let later = crate::probes::clock::rfc3339(SystemTime::now() + Duration::from_secs(7200));
    let gone = l.lock().expire(&later, Duration::from_secs(60)).unwrap();
    assert_eq!(gone.alert_notifications, 2);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn expiry_never_deletes_a_pending_notification() {
    let (dir, l) = temp_ledger("expire-pending");
    l.lock()
        .enqueue_alert_events(&pairs("a", &[event("r", "f", AlertState::Firing, 0)]))
        .unwrap();
    let later = crate::probes::clock::rfc3339(SystemTime::now() + Duration::from_secs(86400 * 30));
    l.lock().expire(&later, Duration::from_secs(60)).unwrap();
    assert_eq!(l.lock().pending_alert_count("a").unwrap(), 1);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn batches_hold_one_rule_and_one_event_per_alert_in_queue_order() {
    let (dir, l) = temp_ledger("batches");
    let items = pairs(
        "a",
        &[
            event("A", "a1", AlertState::Firing, 0),
            event("B", "b1", AlertState::Firing, 0),
            event("A", "a2", AlertState::Firing, 0),
            event("A", "a1", AlertState::Resolved, 0),
            event("A", "a3", AlertState::Firing, 0),
        ],
    );
    l.lock().enqueue_alert_events(&items).unwrap();
    let rows = l.lock().due_alert_rows("a", i64::MAX, 100).unwrap();
    let (b, bad) = batches(rows, 2);
    assert!(bad.is_empty());
    let shape: Vec<Vec<(&str, AlertState)>> = b
        .iter()
        .map(|b| {
            b.iter()
                .map(|(_, e)| (e.fingerprint.as_str(), e.state))
                .collect()
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            vec![("a1", AlertState::Firing), ("a2", AlertState::Firing)],
            vec![("b1", AlertState::Firing)],
            vec![("a1", AlertState::Resolved), ("a3", AlertState::Firing)],
        ]
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
    let o = DeliveryOptions::default();
    for (attempts, full) in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (40, 300)] {
        let d = o.backoff(attempts);
        let full = Duration::from_secs(full);
        assert!(d >= full / 2 && d <= full, "attempt {attempts}: {d:?}");
    }
}

/// A channel that fails its first `fail` attempts, then records what it got.
struct Scripted {
    fail: Mutex<u32>,
    reject: bool,
    got: Mutex<Vec<AlertEvent>>,
}

impl Channel for Scripted {
    fn max_batch(&self) -> usize {
        3
    }
    fn send(&self, batch: &[AlertEvent]) -> Result<(), SendError> {
        if self.reject {
            return Err(SendError::Reject("HTTP 400: no".into()));
        }
        let mut fail = self.fail.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return Err(SendError::Retry("HTTP 503".into()));
        }
        self.got.lock().unwrap().extend_from_slice(batch);
        Ok(())
    }
}

fn options() -> DeliveryOptions {
    DeliveryOptions {
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        poll: Duration::from_millis(50),
        fetch: 4,
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    // Generous: the loop retries every ≤ 40 ms; the deadline is only there
    // so that a broken loop fails the test instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_retries_until_sent_and_sends_each_once_in_order() {
    let (dir, l) = temp_ledger("loop");
    let events: Vec<AlertEvent> = (0..10)
        .flat_map(|i| {
            let fp = format!("f{i}");
            [
                event("r", &fp, AlertState::Firing, 0),
                event("r", &fp, AlertState::Resolved, 0),
            ]
        })
        .collect();
    l.lock().enqueue_alert_events(&pairs("c", &events)).unwrap();
    let channel = Arc::new(Scripted {
        fail: Mutex::new(3),
        reject: false,
        got: Mutex::new(Vec::new()),
    });
    let stats = Arc::new(Stats::default());
    let (_stop_tx, stop) = watch::channel(false);
    let (_wake_tx, wake) = watch::channel(0u64);
    let task = Task {
        ledger: l.clone(),
        name: "c".into(),
        channel: channel.clone(),
        stats: stats.clone(),
        options: options(),
        last_warning: None,
    };
    let handle = tokio::spawn(task.run(wake, stop));
    // Counted after the ledger marked them: then the receiver has them all.
    until("all marked sent", || {
        stats.sent.load(Ordering::Relaxed) >= 20
    })
    .await;
    let got = channel.got.lock().unwrap().clone();
    assert_eq!(got.len(), 20, "each exactly once");
    for i in 0..10 {
        let fp = format!("f{i}");
        let pos: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, e)| e.fingerprint == fp)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(pos.len(), 2);
        assert_eq!(got[pos[0]].state, AlertState::Firing, "{fp}: firing first");
    }
    assert_eq!(stats.failures.load(Ordering::Relaxed), 3);
    assert_eq!(stats.sent.load(Ordering::Relaxed), 20);
    assert_eq!(l.lock().alert_outbox_counts("c").unwrap().sent, 20);
    handle.abort();
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_payload_is_dead_lettered_counted_and_kept() {
    let (dir, l) = temp_ledger("reject");
    l.lock()
        .enqueue_alert_events(&pairs("c", &[event("r", "f", AlertState::Firing, 0)]))
        .unwrap();
    // A row whose JSON no longer decodes is refused too, not retried forever.
    l.lock()
        .enqueue_alert_rows(&[crate::ledger::alert_outbox::NewAlertRow {
            channel: "c",
            rule: "r",
            fingerprint: "g",
            state: "firing",
            starts_at: "x",
            repeat: 0,
            event: "{not json",
        }])
        .unwrap();
    let channel = Arc::new(Scripted {
        fail: Mutex::new(0),
        reject: true,
        got: Mutex::new(Vec::new()),
    });
    let stats = Arc::new(Stats::default());
    let (_stop_tx, stop) = watch::channel(false);
    let (_wake_tx, wake) = watch::channel(0u64);
    let task = Task {
        ledger: l.clone(),
        name: "c".into(),
        channel,
        stats: stats.clone(),
        options: options(),
        last_warning: None,
    };
    let handle = tokio::spawn(task.run(wake, stop));
    until("dead-lettered", || stats.dead.load(Ordering::Relaxed) == 2).await;
    let dead = l.lock().dead_alert_rows(Some("c"), 10).unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .any(|r| r.last_error.as_deref() == Some("HTTP 400: no"))
    );
    assert_eq!(l.lock().pending_alert_count("c").unwrap(), 0);
    handle.abort();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn alertmanager_body_ends_a_firing_alert_at_valid_until_and_a_resolved_one_at_ends_at() {
    let mut firing = event("cost high", "f", AlertState::Firing, 0);
    firing.valid_until = Some("2026-12-01T01:00:00Z".into());
    firing.labels.insert("run.id".into(), "r1".into());
    firing.labels.insert("empty".into(), String::new());
    let resolved = event("cost high", "f", AlertState::Resolved, 0);
    let v: serde_json::Value =
        serde_json::from_slice(&alertmanager::body(&[firing, resolved]).unwrap()).unwrap();
    assert_eq!(v[0]["endsAt"], "2026-12-01T01:00:00Z");
    assert_eq!(v[0]["labels"]["run_id"], "r1");
    assert!(v[0]["labels"].get("empty").is_none());
    assert_eq!(v[0]["labels"]["alertname"], "cost high");
    assert_eq!(v[1]["endsAt"], "2026-12-01T00:05:00Z");
    assert_eq!(v[1]["startsAt"], "2026-12-01T00:00:00Z");
}

#[test]
fn pagerduty_triggers_and_resolves_with_the_fingerprint_as_dedup_key() {
    let t = pagerduty::event("key", &event("r", "fp1", AlertState::Firing, 0));
    let r = pagerduty::event("key", &event("r", "fp1", AlertState::Resolved, 0));
    assert_eq!(t["event_action"], "trigger");
    assert_eq!(r["event_action"], "resolve");
    assert_eq!(t["dedup_key"], "fp1");
    assert_eq!(r["dedup_key"], "fp1");
    assert_eq!(t["payload"]["severity"], "warning");
}

#[test]
fn mail_subjects_are_one_line() {
    let mut e = event("r", "f", AlertState::Firing, 0);
    e.annotations
        .insert("summary".into(), "a\r\nBcc: victim@example".into());
    let s = smtp::subject(&[e]);
    assert!(!s.contains('\n') && !s.contains('\r'), "{s}");
    assert!(s.starts_with("[FIRING:1] r"));
}

#[test]
fn counters_carry_the_channel_label() {
    let (dir, l) = temp_ledger("counters");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let (_stop_tx, stop) = watch::channel(false);
    let c = ChannelConfig {
        name: "am".into(),
        url: "http://127.0.0.1:9".into(),
        ..Default::default()
    };
    let (n, _tasks) = start(l, &[c], DeliveryOptions::default(), stop).unwrap();
    let names: Vec<&str> = n.counters().iter().map(|c| c.0).collect();
    assert!(names.contains(&"mentat_agent_alert_notifications_sent_total{channel=\"am\"}"));
    assert!(names.contains(&"mentat_agent_alert_notifications_pending{channel=\"am\"}"));
    drop(rt);
    std::fs::remove_dir_all(dir).ok();
}

/// A run id is whatever the workload put in its environment: in Slack's
/// mrkdwn `<!channel>` would page everyone in the channel, `<url|text>` would
/// disguise a link.
#[test]
fn slack_text_escapes_what_a_workload_controls() {
    let mut e = event("r", "f", AlertState::Firing, 0);
    e.labels
        .insert("run_id".into(), "<!channel> <https://evil|docs>".into());
    e.annotations
        .insert("summary".into(), "run <!here> & co".into());
    let t = slack::text(&[e]);
    assert!(!t.contains('<') && !t.contains('>'), "{t}");
    assert!(
        t.contains("&lt;!channel&gt;") && t.contains("&amp; co"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_gauge_counts_the_queue_while_the_channel_is_down() {
    let (dir, l) = temp_ledger("gauge");
    let events: Vec<AlertEvent> = (0..4)
        .map(|i| event("r", &format!("f{i}"), AlertState::Firing, 0))
        .collect();
    l.lock().enqueue_alert_events(&pairs("c", &events)).unwrap();
    let stats = Arc::new(Stats::default());
    let (_stop_tx, stop) = watch::channel(false);
    let (_wake_tx, wake) = watch::channel(0u64);
    let task = Task {
        ledger: l.clone(),
        name: "c".into(),
        channel: Arc::new(Scripted {
            fail: Mutex::new(u32::MAX),
            reject: false,
            got: Mutex::new(Vec::new()),
        }),
        stats: stats.clone(),
        options: options(),
        last_warning: None,
    };
    let handle = tokio::spawn(task.run(wake, stop));
    until("failures", || stats.failures.load(Ordering::Relaxed) >= 2).await;
    until("gauge", || stats.pending.load(Ordering::Relaxed) == 4).await;
    handle.abort();
    std::fs::remove_dir_all(dir).ok();
}
