//! Network: socket payload bytes, charged to the process that made the send or receive
//! call and recorded under the cgroup it was in at the time — over TCP (IPv4 and IPv6)
//! and UDP between two cgroups, and in the prefork shape where forked workers accept
//! from a listener their parent opened.
//!
//! Every workload process counts its own payload bytes (the sum of what its `read`,
//! `write`, `send` and `recv` calls returned) and reports them through a pipe, so the
//! ground truth does not come from anything the agent reads.

use mentat_tests::truth::{Prefork, Tcp, Udp};
use mentat_tests::{ProcessRecord, Recording, ScratchCgroup, record_truth};
use serde::de::DeserializeOwned;

/// The records of `pid`, split into those in `cgroup` and the rest.
fn records_in<'a>(
    recording: &'a Recording,
    pid: u32,
    cgroup: &ScratchCgroup,
) -> (Vec<&'a ProcessRecord>, Vec<&'a ProcessRecord>) {
    let cgroup_id = cgroup.id().expect("a scratch cgroup's id");
    recording
        .records
        .of_pid(pid)
        .into_iter()
        .partition(|r| r.cgroup_id == cgroup_id)
}

fn cgroup_dir(cgroup: &ScratchCgroup) -> String {
    cgroup
        .path()
        .to_str()
        .expect("cgroup path is UTF-8")
        .to_owned()
}

/// Each of `records` carries `cgroup`'s path.
fn assert_path(records: &[&ProcessRecord], cgroup: &ScratchCgroup, who: &str) {
    for record in records {
        assert_eq!(
            record.cgroup_path.as_deref(),
            Some(cgroup.relative_path().as_str()),
            "{who} (pid {}) in cgroup {}: wrong cgroup_path; record: {record:#?}",
            record.pid,
            record.cgroup_id
        );
    }
}

fn sum(records: &[&ProcessRecord], metric: impl Fn(&ProcessRecord) -> u64) -> u64 {
    records.iter().map(|r| metric(r)).sum()
}

/// `workload ARGS --server-cgroup B --client-cgroup A` recorded, A and B two
/// fresh cgroups: A, B, the recording and the workload's ground truth.
fn record_between<T: DeserializeOwned>(
    args: &[&str],
) -> (ScratchCgroup, ScratchCgroup, Recording, T) {
    let client = ScratchCgroup::create().expect("creating the client's cgroup (A)");
    let server = ScratchCgroup::create().expect("creating the server's cgroup (B)");
    let (client_dir, server_dir) = (cgroup_dir(&client), cgroup_dir(&server));
    let mut all = args.to_vec();
    all.extend([
        "--server-cgroup",
        &server_dir,
        "--client-cgroup",
        &client_dir,
    ]);
    let (recording, truth) = record_truth(&[], &all);
    (client, server, recording, truth)
}

fn tcp_between_two_cgroups(family: &str) {
    const BYTES: u64 = 64 << 20;
    let bytes = BYTES.to_string();
    let (client_cgroup, server_cgroup, recording, truth): (_, _, _, Tcp) =
        record_between(&["tcp", "--bytes", &bytes, "--family", family]);
    let (client_dir, server_dir) = (cgroup_dir(&client_cgroup), cgroup_dir(&server_cgroup));
    assert_eq!(
        (truth.bytes_sent, truth.bytes_received),
        (BYTES, BYTES),
        "the workload's client and server disagree with the {BYTES} bytes asked for"
    );

    let (client_a, client_elsewhere) = records_in(&recording, truth.client_pid, &client_cgroup);
    let (server_b, server_elsewhere) = records_in(&recording, truth.server_pid, &server_cgroup);
    assert!(
        !client_a.is_empty() && !server_b.is_empty(),
        "IPv{family}: no record of the client (pid {}) in A ({client_dir}) or of the server (pid {}) in B ({server_dir}); \
         client's records: {client_elsewhere:#?}; server's records: {server_elsewhere:#?}",
        truth.client_pid,
        truth.server_pid
    );
    assert_path(&client_a, &client_cgroup, "the TCP client");
    assert_path(&server_b, &server_cgroup, "the TCP server");

    // Counting socket payload is exact (the kernel reports each call's byte count);
    // the 1 % ceiling is the allowance the metering requirement grants, and no more
    // than that may be added (headers, retransmits, loopback counted twice). The floor
    // has no allowance: every payload byte went through a call the agent must see.
    let ceiling = BYTES + BYTES / 100;
    let client_tx = sum(&client_a, |r| r.network_tx_bytes);
    let server_rx = sum(&server_b, |r| r.network_rx_bytes);
    assert!(
        (BYTES..=ceiling).contains(&client_tx),
        "IPv{family}: the client (pid {}) in A sent {BYTES} bytes, but its records there say network_tx_bytes = {client_tx} \
         (expected {BYTES}..={ceiling}); records: {client_a:#?}",
        truth.client_pid
    );
    assert!(
        (BYTES..=ceiling).contains(&server_rx),
        "IPv{family}: the server (pid {}) in B received {BYTES} bytes, but its records there say network_rx_bytes = {server_rx} \
         (expected {BYTES}..={ceiling}); records: {server_b:#?}",
        truth.server_pid
    );

    // The other directions carried no payload (the client only read the server's EOF),
    // and each process opened its socket after moving, so none of its traffic belongs
    // to the cgroup it was forked in: a swap of rx/tx or a stale cgroup shows here.
    let client_all = recording.records.of_pid(truth.client_pid);
    let server_all = recording.records.of_pid(truth.server_pid);
    for (who, records, rx, tx) in [
        (
            "client",
            &client_all,
            0,
            client_tx, // everything it sent is in A
        ),
        ("server", &server_all, server_rx, 0),
    ] {
        let (got_rx, got_tx) = (
            sum(records, |r| r.network_rx_bytes),
            sum(records, |r| r.network_tx_bytes),
        );
        assert_eq!(
            (got_rx, got_tx),
            (rx, tx),
            "IPv{family}: the {who}'s records over all cgroups, (network_rx_bytes, network_tx_bytes); \
             expected all its traffic in its own cgroup and nothing in the other direction; records: {records:#?}"
        );
    }
}

#[test]
fn tcp_over_ipv4_between_two_cgroups() {
    tcp_between_two_cgroups("4");
}

#[test]
fn tcp_over_ipv6_between_two_cgroups() {
    tcp_between_two_cgroups("6");
}

#[test]
fn udp_datagrams_are_counted_exactly() {
    const COUNT: u64 = 10_000;
    const SIZE: u64 = 1_000;
    let (count, size) = (COUNT.to_string(), SIZE.to_string());
    let (client_cgroup, server_cgroup, recording, truth): (_, _, _, Udp) =
        record_between(&["udp", "--count", &count, "--size", &size, "--family", "4"]);
    assert_eq!(
        (truth.datagrams_sent, truth.bytes_sent),
        (COUNT, COUNT * SIZE),
        "the sender did not send all it was asked to"
    );
    // Loopback drops rather than blocks when the receive buffer is full; the paced
    // sender and the large buffer make that rare, and the checks below compare with
    // what did arrive. Most of it must have, or the workload is not testing much.
    assert!(
        truth.datagrams_received >= COUNT * 9 / 10,
        "only {} of {COUNT} datagrams arrived: the workload's pacing or buffer is off",
        truth.datagrams_received
    );

    let (sender, _) = records_in(&recording, truth.client_pid, &client_cgroup);
    let (receiver, _) = records_in(&recording, truth.server_pid, &server_cgroup);
    assert_path(&sender, &client_cgroup, "the UDP sender");
    assert_path(&receiver, &server_cgroup, "the UDP receiver");
    // Exact: a datagram's payload is what one send or recv call returns, and each
    // process counted exactly those returns. One call moves one datagram, so the
    // calls are exact too.
    let got = (
        sum(&sender, |r| r.network_tx_bytes),
        sum(&sender, |r| r.network_tx_calls),
        sum(&receiver, |r| r.network_rx_bytes),
        sum(&receiver, |r| r.network_rx_calls),
    );
    let expected = (
        truth.bytes_sent,
        truth.datagrams_sent,
        truth.bytes_received,
        truth.datagrams_received,
    );
    assert_eq!(
        got, expected,
        "(sender tx bytes, sender tx calls, receiver rx bytes, receiver rx calls) in their cgroups: \
         agent (left) vs the processes' own counts (right); sender's records: {sender:#?}; receiver's records: {receiver:#?}"
    );
}

#[test]
fn prefork_workers_are_charged_their_own_traffic() {
    const REQUESTS: u64 = 50;
    const REQUEST_BYTES: u64 = 10_000;
    const REPLY_BYTES: u64 = 70_000;
    let cgroups = [
        ScratchCgroup::create().expect("creating worker 1's cgroup"),
        ScratchCgroup::create().expect("creating worker 2's cgroup"),
    ];
    let dirs = cgroups.iter().map(cgroup_dir).collect::<Vec<_>>().join(",");
    let (requests, request_bytes, reply_bytes) = (
        REQUESTS.to_string(),
        REQUEST_BYTES.to_string(),
        REPLY_BYTES.to_string(),
    );
    let args = [
        "prefork",
        "--workers",
        "2",
        "--cgroups",
        &dirs,
        "--requests-per-worker",
        &requests,
        "--request-bytes",
        &request_bytes,
        "--reply-bytes",
        &reply_bytes,
    ];
    let (recording, truth): (_, Prefork) = record_truth(&[], &args);
    assert_eq!(truth.workers.len(), 2, "workers in the ground truth");

    for (worker, cgroup) in truth.workers.iter().zip(&cgroups) {
        assert_eq!(
            (worker.connections, worker.bytes_received, worker.bytes_sent),
            (REQUESTS, REQUESTS * REQUEST_BYTES, REQUESTS * REPLY_BYTES),
            "worker {} did not serve what it was asked to: {worker:?}",
            worker.pid
        );
        let (own, elsewhere) = records_in(&recording, worker.pid, cgroup);
        assert!(
            !own.is_empty(),
            "no record of worker {} in its cgroup {}; its records: {elsewhere:#?}",
            worker.pid,
            worker.cgroup
        );
        assert_path(&own, cgroup, "the prefork worker");
        // Exact, as in the UDP test: the worker counted every byte its own calls
        // moved, on connections it accepted from a listener another process opened.
        // An agent keying traffic by the socket's creator would give it all to the
        // parent; one keying it by cgroup at socket creation would put it in the
        // parent's cgroup.
        let got = (
            sum(&own, |r| r.network_rx_bytes),
            sum(&own, |r| r.network_tx_bytes),
        );
        assert_eq!(
            got,
            (worker.bytes_received, worker.bytes_sent),
            "worker {} in {}: (network_rx_bytes, network_tx_bytes) recorded vs counted by the worker; records: {own:#?}",
            worker.pid,
            worker.cgroup
        );
        let stray: u64 = sum(&elsewhere, |r| r.network_rx_bytes + r.network_tx_bytes);
        assert_eq!(
            stray, 0,
            "worker {} moved into {} before accepting, yet records elsewhere carry network bytes: {elsewhere:#?}",
            worker.pid, worker.cgroup
        );
    }

    // The parent only opened the listener: it moved no payload.
    let parent = recording.records.of_pid(truth.parent_pid);
    let parent_bytes = sum(&parent, |r| r.network_rx_bytes + r.network_tx_bytes);
    assert_eq!(
        parent_bytes, 0,
        "the prefork parent (pid {}) moved no payload, yet its records carry {parent_bytes} bytes: {parent:#?}",
        truth.parent_pid
    );
}
