//! Hostile input to the trace-context join (issue 5): a malformed `TRACEPARENT` in an
//! environment, oversized and malformed OTLP payloads, random bytes on both receiver
//! ports, and a span flood past `max_pending_spans`. Each must get a clean error (the
//! proper HTTP or gRPC status, or a closed connection), and the agent must stay up,
//! keep serving and keep its memory bounded.
//!
//! OTLP requests are built and sent by `py/otlp_client.py` (grpcio and
//! opentelemetry-proto: nothing of the agent's own encoding); the oversized HTTP bodies
//! and the random bytes go through raw sockets from here, so that an answer the server
//! sends before it has read the whole body is still seen.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mentat_tests::daemon::rfc3339;
use mentat_tests::traced::{
    TracedDaemon, require_python_otel, rss_bytes, run_python, run_reaped, summary_messages,
    unique_run_id,
};
use mentat_tests::truth::Burn;
use mentat_tests::{record_raw, workload_bin};
use serde_json::Value;

/// `[receiver] max_request_bytes` in these tests.
const MAX_REQUEST: usize = 1 << 20;

/// `[receiver] max_pending_spans` and `max_indexed_spans` in these tests: small, so a
/// flood passes them.
const MAX_PENDING: usize = 100;

/// The `[receiver]` keys of every daemon here (the ports are added by `TracedDaemon`).
fn receiver_keys() -> String {
    format!(
        "max_request_bytes = {MAX_REQUEST}\nmax_pending_spans = {MAX_PENDING}\n\
         max_indexed_spans = {MAX_PENDING}\n"
    )
}

/// A bounded daemon for a memory test: it, its pid, and its resident memory once
/// the first windows and the ledger have settled (the baseline).
fn start_for_memory() -> Result<(TracedDaemon, u32, u64)> {
    require_python_otel()?;
    let d = TracedDaemon::start("1s", &receiver_keys())?;
    let pid = d.daemon.pid().context("the daemon's pid")?;
    thread::sleep(Duration::from_secs(2));
    let baseline = rss_bytes(pid)?;
    Ok((d, pid, baseline))
}

/// Runs `py/otlp_client.py ARGS`; its JSON summary.
fn client(args: &[&str]) -> Result<Value> {
    run_python("otlp_client.py", args, &[], Duration::from_secs(120))?
        .ok("py/otlp_client.py")?
        .truth()
}

fn grpc_target(d: &TracedDaemon) -> String {
    format!("127.0.0.1:{}", d.grpc)
}

fn http_url(d: &TracedDaemon) -> String {
    format!("http://127.0.0.1:{}/v1/traces", d.http)
}

/// The count of `status` in a client summary.
fn answered(summary: &Value, status: &str) -> u64 {
    summary["statuses"][status].as_u64().unwrap_or(0)
}

/// The daemon still serves: `/healthz` answers 200, and a valid span is accepted on
/// both protocols with nothing rejected. Spans of earlier input may still hold the
/// inbox (they leave as their windows commit, `span_lag` and a tick or two later), so
/// a span refused as a whole with the retryable status (gRPC `UNAVAILABLE`, HTTP 503)
/// is sent again after a second, as an SDK does, until a deadline. Returns how many
/// spans were refused so: the daemon counts them as dropped.
fn still_serves(d: &mut TracedDaemon, after: &str) -> Result<u64> {
    ensure!(
        d.daemon.is_running(),
        "the daemon died after {after}; log:\n{}",
        mentat_tests::traced::tail(&d.daemon.log(), 4000)
    );
    let health = d.daemon.get("/healthz", &[])?;
    ensure!(
        health.status == 200,
        "/healthz after {after}: HTTP {}",
        health.status
    );
    // span_lag (10 s) + two ticks is when the flood's last window commits; the
    // rest is room for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refused = 0;
    for (proto, args, ok, busy) in [
        (
            "gRPC",
            ["grpc", "--target", &grpc_target(d)],
            "OK",
            "UNAVAILABLE",
        ),
        ("HTTP", ["http", "--url", &http_url(d)], "200", "503"),
    ] {
        loop {
            let summary = client(&args)?;
            if answered(&summary, ok) == 1 && summary["rejected_spans"] == 0 {
                break;
            }
            ensure!(
                answered(&summary, busy) == 1 && Instant::now() < deadline,
                "a valid span over {proto} after {after}: {summary}"
            );
            refused += 1;
            thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(refused)
}

// ---------------------------------------------------------------------------
// Raw sockets.

/// Writes `request` on a fresh connection to 127.0.0.1:`port` from another thread
/// (ignoring write errors: the server may answer and close before reading it all)
/// and reads what comes back until the server closes or `timeout` passes. Returns
/// the bytes read and whether the server closed the connection.
fn raw_exchange(port: u16, request: Vec<u8>, timeout: Duration) -> Result<(Vec<u8>, bool)> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let mut writer = stream.try_clone().context("cloning the socket")?;
    let sender = thread::spawn(move || {
        for chunk in request.chunks(64 << 10) {
            if writer.write_all(chunk).is_err() {
                return;
            }
        }
    });
    let mut reader = stream;
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        reader
            .set_read_timeout(Some(left))
            .context("setting a read timeout")?;
        match reader.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A reset is the server closing on us with data still unread.
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                break true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break false;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the answer"),
        }
    };
    let _ = reader.shutdown(Shutdown::Both);
    let _ = sender.join();
    Ok((got, closed))
}

/// The status code of an HTTP/1.1 response's first line.
fn http_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// `len` bytes that look random (xorshift, seeded): reproducible hostile input.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Malformed TRACEPARENT.

#[test]
fn malformed_traceparent_is_ignored_and_the_agent_keeps_running() -> Result<()> {
    let mut d = TracedDaemon::start("1s", &receiver_keys())?;
    let workload = workload_bin()?;
    let burn = ["burn", "--threads", "1", "--ms", "300"];
    // Only a garbage TRACEPARENT: no run, no trace.
    let bare = run_reaped(
        &workload,
        &burn,
        &[("TRACEPARENT", "garbage")],
        Duration::from_secs(60),
    )?
    .ok("workload burn")?;
    // A bad TRACEPARENT beside good resource attributes: the run is kept, the bad
    // trace id is not.
    let run_id = unique_run_id("bad-traceparent");
    let attrs = format!("flow.run_id={run_id},agent.id=a");
    let mixed = run_reaped(
        &workload,
        &burn,
        &[
            // Upper-case hex: the W3C format is lower case only.
            (
                "TRACEPARENT",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            ),
            ("OTEL_RESOURCE_ATTRIBUTES", &attrs),
        ],
        Duration::from_secs(60),
    )?
    .ok("workload burn")?;
    d.wait_committed(mixed.ended, Duration::from_secs(30))?;
    let from = rfc3339(bare.started - time::Duration::seconds(5));
    for (reaped, want_run) in [(&bare, None), (&mixed, Some(run_id.as_str()))] {
        let truth: Burn = serde_json::from_value(reaped.truth()?)?;
        for pid in [truth.parent_pid, truth.child_pid] {
            let body = d.daemon.get_json(
                "/v1/records",
                &[
                    ("from", &from),
                    ("where", &format!("pid={pid}")),
                    ("limit", "1000"),
                ],
            )?;
            let records = body["records"].as_array().context("no records")?;
            ensure!(!records.is_empty(), "no records for pid {pid}");
            for r in records {
                ensure!(
                    r["trace_id"].is_null() && r["run_id"].as_str() == want_run,
                    "pid {pid} (TRACEPARENT malformed) has run {} trace {}; expected run \
                     {want_run:?} and no trace",
                    r["run_id"],
                    r["trace_id"]
                );
            }
        }
    }
    still_serves(&mut d, "malformed TRACEPARENTs")?;
    // Both workloads (and their forked children, which inherit nothing to parse)
    // exec'd with a malformed TRACEPARENT: counted, not silent.
    let bad = d.daemon.counter("mentat_agent_bad_traceparents_total")?;
    ensure!(
        bad >= 2,
        "mentat_agent_bad_traceparents_total is {bad} after two malformed TRACEPARENTs"
    );

    // The same under `mentat-agent record`.
    let mut command: Vec<OsString> = vec!["env".into(), "TRACEPARENT=garbage".into()];
    command.push(workload.into_os_string());
    command.extend(burn.map(OsString::from));
    let raw = record_raw("jsonl", &[], Some(&command))?;
    raw.output.ensure_success(&raw.invocation)?;
    let mut processes = 0;
    for line in raw.text.lines().filter(|l| !l.trim().is_empty()) {
        let r: Value = serde_json::from_str(line).with_context(|| format!("record {line}"))?;
        if r["record_type"] == "process" {
            processes += 1;
            ensure!(
                r.get("trace_id").is_some_and(Value::is_null)
                    && r.get("run_id").is_some_and(Value::is_null),
                "record under a malformed TRACEPARENT: {r}"
            );
        }
    }
    ensure!(
        processes >= 2,
        "record printed {processes} process records:\n{}",
        raw.text
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Oversized, malformed and random input.

#[test]
fn oversized_malformed_and_random_input_get_clean_errors() -> Result<()> {
    require_python_otel()?;
    let mut d = TracedDaemon::start("1s", &receiver_keys())?;
    let over = MAX_REQUEST + (256 << 10);

    // HTTP, over the limit: with a Content-Length (refused before the body is read)
    // and chunked (refused once the limit is passed): 413 either way.
    let body = noise(over, 1);
    let mut with_length = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-protobuf\r\n\
         Content-Length: {over}\r\n\r\n"
    )
    .into_bytes();
    with_length.extend_from_slice(&body);
    let mut chunked = b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for chunk in body.chunks(64 << 10) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    for (how, request) in [("Content-Length", with_length), ("chunked", chunked)] {
        let (answer, _) = raw_exchange(d.http, request, Duration::from_secs(20))?;
        ensure!(
            http_status(&answer) == Some(413),
            "an oversized HTTP body ({how}) got {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(300)])
        );
    }
    // gRPC, over the limit: RESOURCE_EXHAUSTED (not a retryable code).
    let pad = over.to_string();
    let big = client(&["grpc", "--target", &grpc_target(&d), "--pad", &pad])?;
    ensure!(
        answered(&big, "RESOURCE_EXHAUSTED") == 1,
        "an oversized gRPC request got {big}"
    );
    // Malformed protobuf under the limit: 400 and INVALID_ARGUMENT.
    let bad_http = client(&["http", "--url", &http_url(&d), "--raw-bytes", "4096"])?;
    ensure!(
        answered(&bad_http, "400") == 1,
        "a malformed HTTP body got {bad_http}"
    );
    let bad_grpc = client(&["grpc", "--target", &grpc_target(&d), "--raw-bytes", "4096"])?;
    ensure!(
        answered(&bad_grpc, "INVALID_ARGUMENT") == 1,
        "a malformed gRPC request got {bad_grpc}"
    );
    // Five requests were refused above, each counted once.
    let refused = d
        .daemon
        .counter("mentat_agent_receiver_rejected_requests_total")?;
    ensure!(
        refused == 5,
        "mentat_agent_receiver_rejected_requests_total is {refused} after 5 refused requests"
    );
    still_serves(&mut d, "oversized and malformed requests")?;

    // Random bytes straight onto both ports: the server closes the connection (after
    // an HTTP 400 on the HTTP port) and nothing else happens.
    for (port, name) in [(d.grpc, "gRPC"), (d.http, "HTTP")] {
        for seed in 0..8u64 {
            let (answer, closed) =
                raw_exchange(port, noise(64 << 10, seed + 7), Duration::from_secs(15))?;
            ensure!(
                closed,
                "random bytes on the {name} port: the connection was not closed within 15 s \
                 (got {} bytes)",
                answer.len()
            );
            if name == "HTTP" && !answer.is_empty() {
                ensure!(
                    http_status(&answer).is_some_and(|s| (400..500).contains(&s)),
                    "random bytes on the HTTP port got {:?}",
                    String::from_utf8_lossy(&answer[..answer.len().min(200)])
                );
            }
        }
    }
    still_serves(&mut d, "random bytes on both ports")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Span floods.

/// How far the daemon's resident set may grow during a flood. The receiver's own
/// bound (its module doc): requests in hand take at most `max_concurrent_requests` (4)
/// × `max_request_bytes` (1 MiB) × (1 + 2 × DECODE_FACTOR (8)) = 68 MiB; spans waiting
/// for `context` are at most `max_pending_spans` (100), a few hundred KiB; nothing is
/// forwarded (no upstream). 60 MiB more covers the allocator keeping freed pages
/// (one arena per worker thread), the ledger's page cache and the span rows it writes.
const RSS_GROWTH_BOUND: u64 = 128 << 20;

/// Floods both protocols past `max_pending_spans`: every request is answered, either
/// OK with the refused spans counted in `partial_success`, or, when none of it fit,
/// with the status SDKs retry (gRPC UNAVAILABLE, HTTP 503); the daemon keeps serving,
/// keeps committing windows, and its memory stays within [`RSS_GROWTH_BOUND`].
#[test]
fn a_span_flood_is_refused_past_the_pending_bound() -> Result<()> {
    let (mut d, pid, baseline) = start_for_memory()?;
    let mut peak = baseline;
    let run_id = unique_run_id("flood");
    let (target, url) = (grpc_target(&d), http_url(&d));
    let mut rejected_total = 0;
    // Large requests (5,000 spans, ~0.4 MiB each) four at a time: each alone is
    // 50 times the pending bound.
    for (proto, dest) in [("grpc", "--target"), ("http", "--url")] {
        let at = if proto == "grpc" { &target } else { &url };
        let summary = client(&[
            proto,
            dest,
            at,
            "--spans",
            "5000",
            "--requests",
            "12",
            "--threads",
            "4",
            "--run-id",
            &run_id,
        ])?;
        let (ok, busy) = if proto == "grpc" {
            ("OK", "UNAVAILABLE")
        } else {
            ("200", "503")
        };
        let rejected = summary["rejected_spans"].as_u64().unwrap_or(0);
        let accepted = summary["accepted"].as_u64().unwrap_or(0);
        let refused_requests = answered(&summary, busy);
        rejected_total += rejected + 5000 * refused_requests;
        ensure!(
            answered(&summary, ok) + refused_requests == 12,
            "{proto} flood: not every request was answered {ok} or {busy}: {summary}"
        );
        // At most what the inbox holds fits per tick; everything else was refused in
        // the answer.
        ensure!(
            accepted + rejected + 5000 * refused_requests == 60_000
                && rejected + refused_requests > 0,
            "{proto} flood: {accepted} accepted, {rejected} rejected, {refused_requests} \
             requests refused: {summary}"
        );
        ensure!(
            summary_messages(&summary)
                .iter()
                .all(|m| m.contains("pending-span bound")),
            "{proto} flood: partial_success and refusal messages {}",
            summary["messages"]
        );
        peak = peak.max(rss_bytes(pid)?);
    }
    rejected_total += still_serves(&mut d, "a flood of large requests")?;
    // Every span the clients were told was rejected is on /metrics as dropped
    // (they were all valid, so none is counted as malformed).
    let dropped = d
        .daemon
        .counter("mentat_agent_receiver_dropped_spans_total")?;
    ensure!(
        dropped == rejected_total,
        "mentat_agent_receiver_dropped_spans_total is {dropped}; the clients were told {rejected_total}"
    );
    ensure!(
        d.daemon
            .counter("mentat_agent_receiver_rejected_spans_total")?
            == 0,
        "valid spans counted as malformed"
    );
    let flooded = time::OffsetDateTime::now_utc();
    d.wait_committed(flooded, Duration::from_secs(30))
        .context("windows stopped being committed after the flood")?;
    peak = peak.max(rss_bytes(pid)?);
    eprintln!(
        "span flood: RSS {} MiB before, {} MiB at the peak",
        baseline >> 20,
        peak >> 20
    );
    ensure!(
        peak - baseline <= RSS_GROWTH_BOUND,
        "the daemon's RSS grew from {} MiB to {} MiB in the flood (bound: +{} MiB)",
        baseline >> 20,
        peak >> 20,
        RSS_GROWTH_BOUND >> 20
    );
    Ok(())
}

/// A sustained flood of requests each no larger than the pending bound, of ten-minute
/// spans that end 50 s from now (inside the 60 s `max_clock_skew`, so they are taken
/// and must be kept for the windows they still touch): what the inbox keeps of them
/// must stay within [`RSS_GROWTH_BOUND`]: nothing here asks the agent to keep more
/// than `max_pending_spans` waiting and `max_indexed_spans` indexed. (Spans that end
/// an hour from now, which this test once sent, are refused at receipt now.)
#[test]
fn long_lived_spans_do_not_grow_memory_without_bound() -> Result<()> {
    let (mut d, pid, baseline) = start_for_memory()?;
    let run_id = unique_run_id("long-spans");
    let target = grpc_target(&d);
    let mut accepted = 0u64;
    let mut growth = Vec::new();
    let over_bound = |rss: u64, growth: &[String]| -> Result<()> {
        if rss.saturating_sub(baseline) > RSS_GROWTH_BOUND {
            bail!(
                "the daemon's RSS grew by {} (accepted ten-minute spans that end 50 s from now; \
                 bound: +{} MiB, max_pending_spans = {MAX_PENDING}): spans kept for later \
                 windows are not bounded",
                growth.join(", then "),
                RSS_GROWTH_BOUND >> 20
            );
        }
        Ok(())
    };
    for _ in 0..10 {
        let summary = client(&[
            "grpc",
            "--target",
            &target,
            "--spans",
            "100",
            "--requests",
            "300",
            "--threads",
            "4",
            "--run-id",
            &run_id,
            "--span-ms",
            "600000",
            "--end-in-ms",
            "50000",
        ])?;
        ensure!(
            answered(&summary, "OK") + answered(&summary, "UNAVAILABLE") == 300,
            "long-span flood: {summary}"
        );
        ensure!(
            !summary_messages(&summary)
                .iter()
                .any(|m| m.contains("times")),
            "long-span flood: spans refused for their times: {summary}"
        );
        // Every span is accounted for in the answers: taken, or refused there.
        let taken = summary["accepted"].as_u64().unwrap_or(0);
        let refused = summary["rejected_spans"].as_u64().unwrap_or(0)
            + 100 * answered(&summary, "UNAVAILABLE");
        ensure!(
            taken + refused == 30_000,
            "long-span flood: {taken} taken and {refused} refused of 30,000: {summary}"
        );
        accepted += taken;
        let rss = rss_bytes(pid)?;
        growth.push(format!(
            "{} MiB at {accepted} spans",
            rss.saturating_sub(baseline) >> 20
        ));
        over_bound(rss, &growth)?;
    }
    // The collector takes the spans in as it closes windows: look again once it has.
    thread::sleep(Duration::from_secs(3));
    let rss = rss_bytes(pid)?;
    growth.push(format!(
        "{} MiB 3 s later",
        rss.saturating_sub(baseline) >> 20
    ));
    over_bound(rss, &growth)?;
    still_serves(&mut d, "a flood of long-lived spans")?;
    eprintln!(
        "long-lived spans: {accepted} accepted; RSS growth {}",
        growth.join(", ")
    );
    Ok(())
}
