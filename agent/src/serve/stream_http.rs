//! `GET /v1/stream`: the hub's notes as JSON messages, over a WebSocket when
//! the client asks for the upgrade, else as Server-Sent Events (`curl -N`).
//!
//! In: the query (`group_by`, `run`, `customer`, `where`, `after`; for SSE
//! also the `Last-Event-ID` header) and a [`Subscription`] to the hub. Out:
//! one text message per committed window (`type: "window"`), per alert state
//! change (`type: "alert"`), and per part of a resume the ledger cannot
//! replay (`type: "gap"`); a client that fell behind gets `type: "dropped"`
//! (and a WebSocket close 1013) when its socket still takes it.
//!
//! Each client runs in its own task: it reads its window messages from the
//! ledger on its own read-only connection, so a slow client or a slow read
//! holds only itself. Every write races the hub's drop signal: a client
//! whose socket is full is closed as soon as its queue overflows.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{
        FromRequestParts, Query, Request, State,
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code},
    },
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, StreamExt, stream::SplitSink};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::{
    ledger::{self, Ledger},
    serve::{
        api::{AppState, MAX_VALUE_LEN, Problem, RangeParams, bad, field_ok, parse_where},
        stream::{
            MAX_REPLAY_WINDOWS, Note, StreamHub, StreamQuery, Subscription, gaps, open_reader,
            render_alert, render_window,
        },
    },
};

/// The largest WebSocket message a client may send (it is ignored anyway).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// How long a final message may take to leave before the socket is just closed.
const FINAL_WRITE: Duration = Duration::from_secs(1);

/// The stream's query parameters.
#[derive(Debug, Default, Deserialize)]
pub struct StreamParams {
    /// One of run, flow, agent, customer, project, container, model, or a ledger field.
    pub group_by: Option<String>,
    /// Only this run's usage (`run_id`).
    pub run: Option<String>,
    /// Only this customer's usage (`customer_id`).
    pub customer: Option<String>,
    /// Comma-separated `field=value`, as on `/v1/usage`.
    #[serde(rename = "where")]
    pub filter: Option<String>,
    /// Resume after this window id.
    pub after: Option<String>,
}

/// The ledger field a `group_by` names (the short names map to `*_id` fields).
fn group_field(name: &str) -> String {
    match name {
        "run" | "flow" | "agent" | "customer" | "project" | "container" => format!("{name}_id"),
        other => other.to_string(),
    }
}

/// Validates the parameters; a bad one is a 400 naming it.
pub(crate) fn parse_query(
    p: &StreamParams,
    last_event_id: Option<&str>,
) -> Result<StreamQuery, Problem> {
    let group_by = match p.group_by.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(g) if g.contains(',') => {
            return Err(bad("group_by", "the stream groups by one field"));
        }
        Some(g) => {
            let f = group_field(g);
            field_ok("group_by", &f)?;
            Some(f)
        }
    };
    let mut filters = parse_where(&RangeParams {
        filter: p.filter.clone(),
        ..RangeParams::default()
    })?;
    for (param, field, v) in [
        ("run", "run_id", &p.run),
        ("customer", "customer_id", &p.customer),
    ] {
        if let Some(v) = v {
            if v.is_empty() || v.len() > MAX_VALUE_LEN {
                return Err(bad(param, format!("must be 1 to {MAX_VALUE_LEN} bytes")));
            }
            filters.push((field.to_string(), v.clone()));
        }
    }
    let after = match p.after.as_deref().or(last_event_id) {
        None => None,
        Some(a) => Some(a.trim().parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            bad(
                "after",
                format!(
                    "{a:?} is not a window id (the `id` of a window message: its start in Unix nanoseconds)"
                ),
            )
        })?),
    };
    Ok(StreamQuery {
        group_by,
        filters,
        after,
    })
}

/// `GET /v1/stream`.
pub(crate) async fn stream(
    State(state): State<AppState>,
    Query(p): Query<StreamParams>,
    req: Request,
) -> Result<Response, Problem> {
    let Some(hub) = state.stream.clone() else {
        return Err(Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the stream is not running in this process".into(),
        ));
    };
    let (mut parts, _) = req.into_parts();
    let wants_ws = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let last_event_id = parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let q = parse_query(&p, last_event_id.as_deref())?;
    if wants_ws {
        let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &state)
            .await
            .map_err(|e| bad("upgrade", e.body_text()))?;
        let sub = hub
            .subscribe()
            .map_err(|e| Problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        // Clients have nothing to say: what they send is read and dropped,
        // so a large frame is refused rather than buffered.
        Ok(upgrade
            .max_message_size(MAX_CLIENT_MESSAGE)
            .max_frame_size(MAX_CLIENT_MESSAGE)
            .on_upgrade(move |socket| ws_client(hub, sub, q, socket)))
    } else {
        let sub = hub
            .subscribe()
            .map_err(|e| Problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        Ok(sse_client(hub, sub, q))
    }
}

/// Where a client's messages go.
enum Out {
    Ws(SplitSink<WebSocket, Message>),
    Sse(mpsc::Sender<Bytes>),
}

impl Out {
    /// Writes one message; Err when the client is gone.
    async fn send(&mut self, msg: &Value) -> Result<(), ()> {
        let text = msg.to_string();
        match self {
            Out::Ws(sink) => sink.send(Message::Text(text.into())).await.map_err(|_| ()),
            Out::Sse(tx) => {
                let id = (msg["type"] == "window")
                    .then(|| msg["id"].as_str().map(|i| format!("id: {i}\n")))
                    .flatten()
                    .unwrap_or_default();
                tx.send(Bytes::from(format!("{id}data: {text}\n\n")))
                    .await
                    .map_err(|_| ())
            }
        }
    }

    /// Tells a dropped client why, if its socket takes it soon, and closes.
    async fn close_behind(&mut self, buffer: usize) {
        let reason = format!(
            "fell behind: more than {buffer} messages queued ([api] stream_client_buffer); resume with ?after=<last window id>"
        );
        let msg = json!({ "type": "dropped", "reason": reason });
        let _ = tokio::time::timeout(FINAL_WRITE, async {
            let _ = self.send(&msg).await;
            if let Out::Ws(sink) = self {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code: close_code::AGAIN,
                        reason: "fell behind".into(),
                    })))
                    .await;
            }
        })
        .await;
    }
}

async fn ws_client(hub: StreamHub, sub: Subscription, q: StreamQuery, socket: WebSocket) {
    let (sink, mut incoming) = socket.split();
    // Reading answers pings and sees the client leave; what it sends is ignored.
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = incoming.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        let _ = gone_tx.send(());
    });
    let Subscription { rx, dropped, guard } = sub;
    tokio::select! {
        () = pump(&hub, rx, dropped, &q, Out::Ws(sink)) => {}
        _ = gone_rx => {}
    }
    reader.abort();
    drop(guard);
}

fn sse_client(hub: StreamHub, sub: Subscription, q: StreamQuery) -> Response {
    // One message in hand: the socket's own buffer is the rest.
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let Subscription {
        rx: notes,
        dropped,
        guard,
    } = sub;
    tokio::spawn(async move { pump(&hub, notes, dropped, &q, Out::Sse(tx)).await });
    // The body holds the connection's place among the clients: it counts
    // against the limit until its socket goes, even after its pump stopped.
    let hello = Bytes::from_static(b": mentat-agent stream\n\n");
    let body = futures_util::stream::once(async move { Ok::<_, Infallible>(hello) }).chain(
        futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(b), (rx, guard)))
        }),
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Reads a window's message on the client's connection, off the async threads.
async fn render(
    hub: &StreamHub,
    reader: &mut Option<Ledger>,
    q: &StreamQuery,
    window: (i64, i64, i64),
) -> Value {
    let start_ns = window.0;
    let _permit = hub.render_permit().await;
    let l = reader.take();
    let (node, q) = (hub.node().to_string(), q.clone());
    let hub2 = hub.clone();
    let out = tokio::task::spawn_blocking(move || {
        let l = match l {
            Some(l) => l,
            None => match open_reader(&hub2) {
                Ok(l) => l,
                Err(e) => return (None, Err(e)),
            },
        };
        let r = render_window(&l, &node, window, &q);
        (Some(l), r)
    })
    .await;
    match out {
        Ok((l, Ok(msg))) => {
            *reader = l;
            msg
        }
        Ok((l, Err(e))) => {
            *reader = l;
            error_message(start_ns, &e.to_string())
        }
        Err(e) => error_message(start_ns, &e.to_string()),
    }
}

fn error_message(start_ns: i64, why: &str) -> Value {
    json!({ "type": "error", "id": start_ns.to_string(), "reason": format!("reading window {start_ns} from the ledger: {why}") })
}

/// Replays after `q.after`, then forwards live notes, until the client
/// leaves or falls behind.
async fn pump(
    hub: &StreamHub,
    mut notes: mpsc::Receiver<Note>,
    dropped: Arc<Notify>,
    q: &StreamQuery,
    mut out: Out,
) {
    let mut reader: Option<Ledger> = None;
    let mut last: Option<i64> = None;
    // Every write races the drop signal (the socket may never drain).
    macro_rules! send {
        ($msg:expr) => {{
            let msg = $msg;
            tokio::select! {
                biased;
                () = dropped.notified() => {
                    out.close_behind(hub.client_buffer()).await;
                    return;
                }
                r = out.send(&msg) => if r.is_err() { return },
            }
        }};
    }
    if let Some(after) = q.after {
        last = Some(after);
        let plan = {
            let path = hub.ledger_path().clone();
            tokio::task::spawn_blocking(move || {
                ledger::Ledger::open_read_only(&path)
                    .and_then(|l| l.windows_after(after, MAX_REPLAY_WINDOWS))
            })
            .await
        };
        match plan {
            Ok(Ok(plan)) => {
                for g in gaps(after, &plan) {
                    send!(g);
                }
                for (start, end, min_start) in plan.windows {
                    let window = (start, end, min_start);
                    let msg = hub
                        .window_message(window, q, render(hub, &mut reader, q, window))
                        .await;
                    send!(msg);
                    last = Some(start);
                }
            }
            Ok(Err(e)) => send!(
                json!({ "type": "gap", "after": after.to_string(), "until": null, "reason": format!("the ledger could not list the windows to replay: {e}") })
            ),
            Err(e) => send!(
                json!({ "type": "gap", "after": after.to_string(), "until": null, "reason": e.to_string() })
            ),
        }
    }
    loop {
        let note = tokio::select! {
            biased;
            () = dropped.notified() => {
                out.close_behind(hub.client_buffer()).await;
                return;
            }
            n = notes.recv() => n,
        };
        match note {
            None => return,
            Some(Note::Window {
                start_ns,
                end_ns,
                min_start_ns,
            }) => {
                if last.is_some_and(|l| start_ns <= l) {
                    continue;
                }
                let window = (start_ns, end_ns, min_start_ns);
                let msg = hub
                    .window_message(window, q, render(hub, &mut reader, q, window))
                    .await;
                send!(msg);
                last = Some(start_ns);
            }
            Some(Note::Alert(e)) => {
                if let Some(msg) = render_alert(&e, q) {
                    send!(msg);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        str::FromStr,
        sync::{Arc, atomic::AtomicBool},
        time::Duration,
    };

    use rust_decimal::Decimal;

    use super::*;
    use crate::{
        alert::{AlertEvent, AlertState},
        probes::clock::rfc3339_of_ns,
        report::record::{Cost, UsageRecord},
        serve::{prometheus::Exposition, stream::StreamLimits},
    };

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_767_225_600 * S;

    use crate::serve::api::tests::serve_in_background as serve;

    fn alert(run: &str) -> AlertEvent {
        AlertEvent {
            rule: "run-cost".into(),
            kind: "threshold".into(),
            fingerprint: "f".into(),
            state: AlertState::Firing,
            labels: [("run_id".to_string(), run.to_string())].into(),
            annotations: Default::default(),
            value: "6".into(),
            threshold: "5".into(),
            starts_at: rfc3339_of_ns(T0),
            ends_at: None,
            at: rfc3339_of_ns(T0),
            node: "n1".into(),
            repeat: 0,
            valid_until: None,
        }
    }

    /// SSE in-process: a committed window and an alert arrive, in order, and
    /// an alert for another run is filtered out; bad parameters are 400s.
    #[test]
    fn sse_carries_windows_and_matching_alerts_and_bad_parameters_are_named() {
        let dir = std::env::temp_dir().join(format!("mentat-stream-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("l.db");
        let mut l = Ledger::open(&path, Duration::from_secs(86_400)).expect("open");
        let hub = StreamHub::new("n1", path.clone(), StreamLimits::default());
        let state = AppState::new(
            path,
            Exposition::new(Default::default(), |_| true),
            Arc::new(AtomicBool::new(true)),
        )
        .with_stream(hub.clone());
        let base = serve(state);
        let bad = ureq::get(format!("{base}/v1/stream?group_by=nope"))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .expect("call");
        assert_eq!(bad.status(), 400);
        let resp = ureq::get(format!("{base}/v1/stream?run=r1&group_by=run"))
            .call()
            .expect("stream");
        let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
        // The hello comment: the client is subscribed.
        assert!(lines.next().is_some());
        let total = Decimal::from_str("0.25").expect("d");
        let record = UsageRecord {
            record_id: "a".into(),
            node: "n1".into(),
            window_start: rfc3339_of_ns(T0),
            window_end: rfc3339_of_ns(T0 + S),
            record_kind: "process".into(),
            context: crate::identity::run::RunContext {
                run_id: Some("r1".into()),
                ..Default::default()
            },
            cost: Some(Cost {
                cpu: total,
                subtotal: total,
                total,
                currency: "USD".into(),
                pricing_version: "v1".into(),
                ..Cost::default()
            }),
            ..UsageRecord::default()
        };
        l.commit_window(&rfc3339_of_ns(T0), &rfc3339_of_ns(T0 + S), &[record], &[])
            .expect("commit");
        hub.publish_window(T0, T0 + S, T0);
        hub.publish_alert(&alert("other"));
        hub.publish_alert(&alert("r1"));
        let mut data = Vec::new();
        let mut ids = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("line");
            if let Some(id) = line.strip_prefix("id: ") {
                ids.push(id.to_string());
            }
            if let Some(d) = line.strip_prefix("data: ") {
                data.push(serde_json::from_str::<Value>(d).expect("json"));
                if data.len() == 2 {
                    break;
                }
            }
        }
        assert_eq!(data[0]["type"], "window");
        assert_eq!(data[0]["id"], T0.to_string());
        assert_eq!(ids, vec![T0.to_string()]);
        assert_eq!(data[0]["totals"]["cost"]["total"], "0.25");
        assert_eq!(data[0]["groups"][0]["key"], "r1");
        assert_eq!(data[1]["type"], "alert");
        assert_eq!(data[1]["alert"]["labels"]["run_id"], "r1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
