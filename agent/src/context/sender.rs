//! Sender binding: who sent a span, as the kernel says, and what it may claim.
//!
//! The agent bills on nodes shared by tenants who do not trust each other, so
//! a span's `process.pid`, `container.id` and `k8s.pod.uid` are claims, not
//! facts. Each connection to the receiver is bound to its sender by the
//! kernel: the `sock_send_length` probe (agent-ebpf `probes/net.rs`) records,
//! for every established TCP socket that sends to a receiver port, the
//! socket's own (address, port) → the sending process (tgid, start time,
//! cgroup v2 id, network namespace). The receiver looks the peer address it
//! sees up in that table ([`Binder::identify`]) once per connection: one map
//! lookup, no `/proc` scan.
//!
//! The trust model ([`Binder::bind`]):
//! - a span naming no process binds to the sender's own process;
//! - a claimed host `process.pid` is believed when it is the sender's own
//!   process or a process in the sender's container or pod;
//! - a claimed namespace pid (with `container.id` / `k8s.pod.uid`) is believed
//!   when the container and pod it names are the sender's own;
//! - anything else is refused, counted (`mentat_agent_receiver_spans_refused_claims_total`)
//!   and reported to the client in `partial_success`;
//! - a connection whose sender the kernel cannot name (another node's pod, a
//!   NATed source, a kernel older than 6.3) is refused whole, counted
//!   (`mentat_agent_receiver_spans_unidentified_total`), unless it matches a
//!   configured trusted forwarder;
//! - trusted forwarders (`[receiver] trusted_forwarders`: `cgroup:<path
//!   prefix>` for a process the kernel identified, `addr:<ip>` for a peer
//!   address) are believed whatever they claim.
//!
//! `customer.id`, `user.id`, `flow.run_id` and token counts cannot be
//! verified; after binding they only ever attach to the sender's own
//! processes (its usage split and its token records carry its pid), so a
//! tenant can label its own usage but not bill or dilute anyone else's.
//!
//! Loopback peers are matched only to sockets in the agent's own network
//! namespace: every namespace has its own 127.0.0.1, and a pod must not be
//! able to pose as a host process that uses the same port number.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use agent_common::{ReceiverPorts, SenderKey, SenderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tracing::warn;

use crate::{
    context::{
        receiver::convert::{resource_claim, spans_of_resource_for_inbox as spans_of_resource},
        spans::{PidScope, Span, SpanSender},
    },
    identity::{process::Cgroups, workload::parse_cgroup_path},
    probes::SenderMaps,
};

/// A request after [`Binder::bind_request`].
#[derive(Debug)]
pub struct BoundRequest {
    /// The spans accepted, each bound to its sender.
    pub spans: Vec<Span>,
    /// What was refused.
    pub refused: Refused,
    /// What may be forwarded (refused resources removed), with the host pid
    /// each resource's spans are bound to; `None`: nothing.
    pub forward: Option<(ExportTraceServiceRequest, Vec<Option<u32>>)>,
}

/// A configured trusted forwarder (`[receiver] trusted_forwarders`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustRule {
    /// `cgroup:<prefix>`: a sender the kernel identified whose cgroup v2 path
    /// (relative to the v2 mount) is `<prefix>` or below it.
    Cgroup(String),
    /// `addr:<ip>`: any connection from this peer address.
    Addr(IpAddr),
}

impl std::str::FromStr for TrustRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("cgroup", p)) if p.starts_with('/') => {
                Ok(TrustRule::Cgroup(p.trim_end_matches('/').to_string()))
            }
            Some(("addr", a)) => a
                .parse::<IpAddr>()
                .map(|ip| TrustRule::Addr(ip.to_canonical()))
                .map_err(|e| format!("trusted forwarder {s:?}: {e}")),
            _ => Err(format!(
                "trusted forwarder {s:?}: expected cgroup:/<path> or addr:<ip>"
            )),
        }
    }
}

/// A sender the kernel identified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identified {
    /// What travels with its spans.
    pub sender: SpanSender,
    /// Its cgroup v2 path, when it resolved.
    pub cgroup_path: Option<String>,
    /// The container it runs in, from its cgroup path.
    pub container_id: Option<String>,
    /// The pod it runs in, from its cgroup path.
    pub pod_uid: Option<String>,
}

/// Who sent one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sender {
    /// Binding is off (a receiver not run by the daemon): claims believed.
    Unchecked,
    /// A trusted forwarder: claims believed; identified when the kernel knew it.
    Trusted(Option<Identified>),
    /// A sender the kernel identified: claims checked against it.
    Bound(Identified),
    /// The kernel does not know this peer and no rule trusts it.
    Unidentified,
}

impl Sender {
    /// The key per-sender bounds count by (the sender's cgroup: a tenant's
    /// container), `None` where there is no identity to count by.
    pub fn quota_key(&self) -> Option<u64> {
        match self {
            Sender::Bound(i) | Sender::Trusted(Some(i)) => Some(i.sender.cgroup_id),
            _ => None,
        }
    }
}

/// What [`Binder::bind`] refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refused {
    /// Spans from a sender nobody could identify.
    pub unidentified: u64,
    /// Spans whose pid, container or pod claim is outside the sender's own.
    pub claims: u64,
}

impl Refused {
    /// All refused spans.
    pub fn total(&self) -> u64 {
        self.unidentified + self.claims
    }

    /// The client-facing reason, for `partial_success`.
    pub fn message(&self) -> Option<String> {
        match (self.unidentified, self.claims) {
            (0, 0) => None,
            (u, 0) => Some(format!(
                "{u} spans refused: the sender is not identified by the node's kernel and is not a trusted forwarder"
            )),
            (0, c) => Some(format!(
                "{c} spans refused: they claim a process, container or pod that is not the sender's"
            )),
            (u, c) => Some(format!(
                "{u} spans from an unidentified sender and {c} spans claiming another process, container or pod refused"
            )),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct BinderStats {
    /// Connections whose sender was identified.
    pub identified: AtomicU64,
    /// Connections whose sender could not be identified.
    pub unidentified_connections: AtomicU64,
    /// Spans refused for an unidentified sender.
    pub unidentified_spans: AtomicU64,
    /// Spans refused for a claim outside the sender's own processes.
    pub refused_claims: AtomicU64,
    /// Spans that named no process and were bound to their sender's.
    pub bound_to_sender: AtomicU64,
    /// Spans from trusted forwarders (claims believed).
    pub trusted: AtomicU64,
}

/// The configured ports the probe watches; at most this many.
const MAX_PORTS: usize = 4;

/// A cgroup's path, container id and pod uid.
type CgroupIds = (Option<String>, Option<String>, Option<String>);

/// Where identification comes from.
enum Source {
    /// Binding off: every sender [`Sender::Unchecked`].
    Off,
    /// The kernel's table; `None` where this kernel cannot fill one.
    Kernel(Option<Box<Mutex<SenderMaps>>>),
    /// A fixed answer for every peer (tests of the receiver).
    #[cfg(test)]
    Fixed(Sender),
}

/// Identifies senders and checks their claims.
pub struct Binder {
    source: Source,
    rules: Vec<TrustRule>,
    own_netns: u32,
    proc_root: PathBuf,
    cgroups: Mutex<Cgroups>,
    /// Cached identity of each cgroup id: its path, container and pod.
    cgroup_identity: Mutex<HashMap<u64, CgroupIds>>,
    /// Counters.
    pub stats: BinderStats,
}

impl std::fmt::Debug for Binder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binder")
            .field("rules", &self.rules)
            .field("own_netns", &self.own_netns)
            .finish()
    }
}

impl Binder {
    /// Binding off: every claim believed. Only for receivers that meter no
    /// one (library tests); the daemon always binds.
    pub fn off() -> Self {
        Self::with_source(Source::Off, Vec::new())
    }

    /// Binds senders through the kernel's table (`None`: this kernel has none,
    /// so only `rules` can admit a sender), trusting `rules`.
    pub fn kernel(maps: Option<SenderMaps>, rules: Vec<TrustRule>) -> Self {
        if maps.is_none() {
            warn!(
                "sender binding: the kernel cannot identify senders (needs Linux ≥ 6.3 socket tracepoints); spans are accepted from trusted forwarders only"
            );
        }
        Self::with_source(Source::Kernel(maps.map(|m| Box::new(Mutex::new(m)))), rules)
    }

    #[cfg(test)]
    pub(crate) fn fixed(sender: Sender) -> Self {
        Self::with_source(Source::Fixed(sender), Vec::new())
    }

    fn with_source(source: Source, rules: Vec<TrustRule>) -> Self {
        let own_netns = fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino() as u32)
            .unwrap_or(0);
        Self {
            source,
            rules,
            own_netns,
            proc_root: PathBuf::from("/proc"),
            cgroups: Mutex::new(Cgroups::discover()),
            cgroup_identity: Mutex::new(HashMap::new()),
            stats: BinderStats::default(),
        }
    }

    /// Whether senders are bound (false: claims believed, see [`Binder::off`]).
    pub fn enforcing(&self) -> bool {
        !matches!(self.source, Source::Off)
    }

    /// Tells the kernel which ports the receiver listens on (as clients
    /// address them: a hostPort must equal its containerPort).
    pub fn watch_ports(&self, ports: &[u16]) {
        let Source::Kernel(Some(maps)) = &self.source else {
            return;
        };
        let mut value = ReceiverPorts::default();
        for (slot, port) in value.ports.iter_mut().zip(ports.iter().take(MAX_PORTS)) {
            *slot = *port;
        }
        if let Ok(mut m) = maps.lock()
            && let Err(e) = m.ports.set(0, value, 0)
        {
            warn!(error = %e, "sender binding: cannot set the receiver ports; no sender will be identified");
        }
    }

    /// The sender of a connection from `peer`, as the kernel knows it now.
    /// A miss may be a connection whose first send is still in the kernel's
    /// hands: callers may ask again shortly.
    pub fn identify(&self, peer: SocketAddr) -> Sender {
        let ip = peer.ip().to_canonical();
        let by_addr = self
            .rules
            .iter()
            .any(|r| matches!(r, TrustRule::Addr(a) if *a == ip));
        let found = match &self.source {
            Source::Off => return Sender::Unchecked,
            #[cfg(test)]
            Source::Fixed(s) => return s.clone(),
            Source::Kernel(maps) => maps.as_ref().and_then(|m| self.lookup(m, peer)),
        };
        let identified = found.map(|v| self.identified(&v));
        let trusted_cgroup = identified
            .as_ref()
            .and_then(|i| i.cgroup_path.as_deref())
            .is_some_and(|p| cgroup_trusted(p, &self.rules));
        match identified {
            _ if by_addr => Sender::Trusted(identified),
            Some(mut i) if trusted_cgroup => {
                i.sender.trusted = true;
                Sender::Trusted(Some(i))
            }
            Some(i) => Sender::Bound(i),
            None => Sender::Unidentified,
        }
    }

    /// Counts one connection's identification (once per connection).
    pub fn count_connection(&self, sender: &Sender) {
        let counter = match sender {
            Sender::Unidentified => &self.stats.unidentified_connections,
            Sender::Bound(_) | Sender::Trusted(Some(_)) => &self.stats.identified,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn lookup(&self, maps: &Mutex<SenderMaps>, peer: SocketAddr) -> Option<SenderValue> {
        let mut key = SenderKey {
            port: peer.port(),
            ..SenderKey::default()
        };
        key.addr = match peer.ip().to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let value = maps.lock().ok()?.senders.get(&key, 0).ok()?;
        // Every namespace has its own loopback: only ours can be trusted.
        if peer.ip().to_canonical().is_loopback() && value.netns != self.own_netns {
            return None;
        }
        Some(value)
    }

    fn identified(&self, v: &SenderValue) -> Identified {
        let (cgroup_path, container_id, pod_uid) = self.cgroup_identity(v.cgroup_id);
        Identified {
            sender: SpanSender {
                pid: v.tgid,
                start_ns: v.start_ns,
                cgroup_id: v.cgroup_id,
                trusted: false,
            },
            cgroup_path,
            container_id,
            pod_uid,
        }
    }

    fn cgroup_identity(&self, id: u64) -> CgroupIds {
        if let Some(known) = self
            .cgroup_identity
            .lock()
            .ok()
            .and_then(|c| c.get(&id).cloned())
        {
            return known;
        }
        let path = self.cgroups.lock().ok().and_then(|mut c| c.path_of(id));
        let ident = path.as_deref().map(parse_cgroup_path).unwrap_or_default();
        let entry = (path.clone(), ident.container_id, ident.pod_uid);
        if path.is_some()
            && let Ok(mut c) = self.cgroup_identity.lock()
        {
            // A node has a few thousand cgroups; a full cache is rebuilt.
            if c.len() >= 16_384 {
                c.clear();
            }
            c.insert(id, entry.clone());
        }
        entry
    }

    /// Binds the spans of `request` from `sender`: each span gets its
    /// sender, spans that name no process get the sender's, and resources
    /// whose claims are outside the sender's own processes are refused and
    /// counted. What is left to forward goes with each resource's host pid.
    pub fn bind_request(
        &self,
        sender: &Sender,
        request: ExportTraceServiceRequest,
    ) -> BoundRequest {
        let mut refused = Refused::default();
        let mut spans = Vec::new();
        let mut host_pids = Vec::with_capacity(request.resource_spans.len());
        let mut keep = Vec::with_capacity(request.resource_spans.len());
        // One verdict per distinct claim: batches repeat their resource.
        let mut verdicts: HashMap<(u32, Option<PidScope>), Option<Option<u32>>> = HashMap::new();
        for rs in &request.resource_spans {
            let (claimed, scope) = resource_claim(rs);
            let before = spans.len();
            // The resource's verdict: None refused, Some(host pid for enrichment).
            let verdict = match (sender, claimed) {
                (Sender::Unchecked, _) => {
                    spans_of_resource(rs, None, &mut spans);
                    Some(claimed.filter(|_| scope.is_none()))
                }
                (Sender::Unidentified, _) => {
                    spans_of_resource(rs, None, &mut spans);
                    refused.unidentified += (spans.len() - before) as u64;
                    spans.truncate(before);
                    None
                }
                (Sender::Trusted(i), _) => {
                    let own = i.as_ref().map(|i| SpanSender {
                        trusted: true,
                        ..i.sender
                    });
                    spans_of_resource(rs, own.map(|o| o.pid), &mut spans);
                    for s in &mut spans[before..] {
                        s.sender = own;
                    }
                    self.stats
                        .trusted
                        .fetch_add((spans.len() - before) as u64, Ordering::Relaxed);
                    Some(match claimed {
                        None => own.map(|o| o.pid),
                        Some(pid) => Some(pid).filter(|_| scope.is_none()),
                    })
                }
                (Sender::Bound(i), None) => {
                    spans_of_resource(rs, Some(i.sender.pid), &mut spans);
                    for s in &mut spans[before..] {
                        s.sender = Some(i.sender);
                    }
                    self.stats
                        .bound_to_sender
                        .fetch_add((spans.len() - before) as u64, Ordering::Relaxed);
                    Some(Some(i.sender.pid))
                }
                (Sender::Bound(i), Some(pid)) => {
                    let verdict = *verdicts
                        .entry((pid, scope.clone()))
                        .or_insert_with(|| self.claim(i, pid, scope.as_ref()));
                    spans_of_resource(rs, Some(i.sender.pid), &mut spans);
                    if verdict.is_some() {
                        for s in &mut spans[before..] {
                            s.sender = Some(i.sender);
                        }
                    } else {
                        refused.claims += (spans.len() - before) as u64;
                        spans.truncate(before);
                    }
                    verdict
                }
            };
            keep.push(verdict.is_some());
            host_pids.push(verdict.flatten());
        }
        if refused.claims > 0 {
            let total = self
                .stats
                .refused_claims
                .fetch_add(refused.claims, Ordering::Relaxed)
                + refused.claims;
            if let Sender::Bound(i) = sender
                && warn_allowed()
            {
                warn!(
                    sender_pid = i.sender.pid,
                    sender_cgroup = i.cgroup_path.as_deref().unwrap_or("?"),
                    refused = refused.claims,
                    total_refused = total,
                    "OTLP receiver: spans refused: they claim a process, container or pod that is not the sender's"
                );
            }
        }
        if refused.unidentified > 0 {
            self.stats
                .unidentified_spans
                .fetch_add(refused.unidentified, Ordering::Relaxed);
        }
        // Refused resources are not forwarded either: the client was told so.
        let forward = if keep.iter().all(|k| *k) {
            Some((request, host_pids))
        } else if keep.iter().any(|k| *k) {
            let mut request = request;
            let mut flags = keep.iter();
            request
                .resource_spans
                .retain(|_| flags.next().copied().unwrap_or(false));
            let mut flags = keep.iter();
            host_pids.retain(|_| flags.next().copied().unwrap_or(false));
            Some((request, host_pids))
        } else {
            None
        };
        BoundRequest {
            spans,
            refused,
            forward,
        }
    }

    /// Whether `sender` may claim `pid` (with `scope`: a pid in that
    /// container's or pod's namespace); when it may, the host pid to look
    /// its cost up by, if known now.
    fn claim(
        &self,
        sender: &Identified,
        pid: u32,
        scope: Option<&PidScope>,
    ) -> Option<Option<u32>> {
        if !self.may_claim(sender, pid, scope) {
            return None;
        }
        Some(match scope {
            None => Some(pid),
            // The sender's own namespace pid: its own host pid. Any other is
            // mapped later by the collector; not known as a host pid here.
            Some(_) => crate::identity::process::read_ns_pid(&self.proc_root, sender.sender.pid)
                .filter(|ns| *ns == pid)
                .map(|_| sender.sender.pid),
        })
    }

    /// Whether `sender` may speak for `pid` (a host pid, or with `scope` a pid
    /// in that container's or pod's namespace).
    fn may_claim(&self, sender: &Identified, pid: u32, scope: Option<&PidScope>) -> bool {
        match scope {
            Some(scope) => {
                // The namespace pid is mapped later, inside the named
                // container or pod: both must be the sender's own.
                let container_ok = scope
                    .container_id
                    .as_ref()
                    .is_none_or(|c| sender.container_id.as_ref() == Some(c));
                let pod_ok = scope
                    .pod_uid
                    .as_ref()
                    .is_none_or(|u| sender.pod_uid.as_ref() == Some(u));
                (scope.container_id.is_some() || scope.pod_uid.is_some()) && container_ok && pod_ok
            }
            None => {
                if pid == sender.sender.pid {
                    return true;
                }
                if sender.container_id.is_none() && sender.pod_uid.is_none() {
                    // A host process speaks for itself only.
                    return false;
                }
                let claimed = proc_cgroup(&self.proc_root, pid)
                    .map(|p| parse_cgroup_path(&p))
                    .unwrap_or_default();
                (sender.pod_uid.is_some() && claimed.pod_uid == sender.pod_uid)
                    || (sender.container_id.is_some()
                        && claimed.container_id == sender.container_id)
            }
        }
    }

    /// Entries the kernel wrote and failed to write, summed over CPUs.
    fn kernel_counts(&self) -> (u64, u64) {
        let Source::Kernel(Some(maps)) = &self.source else {
            return (0, 0);
        };
        let Ok(m) = maps.lock() else {
            return (0, 0);
        };
        let sum = |i: u32| {
            m.stats
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().copied().sum::<u64>())
                .unwrap_or(0)
        };
        (sum(0), sum(1))
    }

    /// The counters as (name, help, value), for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (written, failed) = self.kernel_counts();
        vec![
            (
                "mentat_agent_receiver_senders_identified_total",
                "Receiver connections whose sending process the kernel identified.",
                v(&self.stats.identified),
            ),
            (
                "mentat_agent_receiver_senders_unidentified_total",
                "Receiver connections whose sender the kernel could not identify (another node, NAT, evicted entry, kernel < 6.3) and no trusted-forwarder rule admitted.",
                v(&self.stats.unidentified_connections),
            ),
            (
                "mentat_agent_receiver_spans_unidentified_total",
                "Spans refused because their sender was not identified and is not a trusted forwarder.",
                v(&self.stats.unidentified_spans),
            ),
            (
                "mentat_agent_receiver_spans_refused_claims_total",
                "Spans refused because they claim a process.pid, container.id or k8s.pod.uid outside the sender's own process, container and pod.",
                v(&self.stats.refused_claims),
            ),
            (
                "mentat_agent_receiver_spans_bound_to_sender_total",
                "Spans that named no process and were bound to their sender's process.",
                v(&self.stats.bound_to_sender),
            ),
            (
                "mentat_agent_receiver_spans_trusted_total",
                "Spans from configured trusted forwarders, whose claims are believed.",
                v(&self.stats.trusted),
            ),
            (
                "mentat_agent_sender_entries_written_total",
                "Client sockets the kernel recorded as sending to the receiver.",
                written,
            ),
            (
                "mentat_agent_sender_entries_failed_total",
                "Client sockets the kernel could not record (map update failed).",
                failed,
            ),
        ]
    }
}

/// Whether the cgroup `path` is one a `cgroup:` rule names, or below it.
fn cgroup_trusted(path: &str, rules: &[TrustRule]) -> bool {
    rules.iter().any(|r| match r {
        TrustRule::Cgroup(prefix) => {
            prefix.is_empty()
                || path == prefix
                || path
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        }
        TrustRule::Addr(_) => false,
    })
}

/// Whether a refusal warning may be logged now: one a minute, the counters
/// carry the exact numbers.
fn warn_allowed() -> bool {
    static EPOCH: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = EPOCH.elapsed().as_secs() + 1;
    let last = LAST.load(Ordering::Relaxed);
    (last == 0 || now >= last + 60)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// The cgroup v2 path of `pid` from `/proc/<pid>/cgroup`.
fn proc_cgroup(proc_root: &Path, pid: u32) -> Option<String> {
    let text = fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The pid a span binds when the collector could not map its claimed
/// namespace pid: its sender's own, unless a trusted forwarder sent it (its
/// spans speak for others, so they bind nothing).
pub fn unmapped_fallback(span: &Span) -> Option<u32> {
    span.sender.filter(|s| !s.trusted).map(|s| s.pid)
}

/// Parses `[receiver] trusted_forwarders`.
pub fn parse_rules(rules: &[String]) -> Result<Vec<TrustRule>, String> {
    rules.iter().map(|r| r.parse()).collect()
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue, any_value::Value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan},
    };

    use super::*;

    const C1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const C2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn sender(pid: u32, container: Option<&str>) -> Sender {
        Sender::Bound(Identified {
            sender: SpanSender {
                pid,
                start_ns: 1,
                cgroup_id: 7,
                trusted: false,
            },
            cgroup_path: Some("/x".into()),
            container_id: container.map(str::to_string),
            pod_uid: None,
        })
    }

    /// One resource per entry: its claimed pid and container, one span each.
    fn request(resources: &[(Option<i64>, Option<&str>)]) -> ExportTraceServiceRequest {
        let kv = |k: &str, v: Value| KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: resources
                .iter()
                .enumerate()
                .map(|(n, (pid, container))| {
                    let mut attributes = Vec::new();
                    if let Some(pid) = pid {
                        attributes.push(kv("process.pid", Value::IntValue(*pid)));
                    }
                    if let Some(c) = container {
                        attributes.push(kv("container.id", Value::StringValue((*c).into())));
                    }
                    ResourceSpans {
                        resource: Some(Resource {
                            attributes,
                            ..Default::default()
                        }),
                        scope_spans: vec![ScopeSpans {
                            spans: vec![OtlpSpan {
                                trace_id: vec![1; 16],
                                span_id: vec![n as u8 + 1; 8],
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn rules_parse_and_refuse_garbage() {
        assert_eq!(
            "cgroup:/system.slice/otelcol.service/".parse::<TrustRule>(),
            Ok(TrustRule::Cgroup("/system.slice/otelcol.service".into()))
        );
        assert_eq!(
            "addr:::ffff:10.0.0.1".parse::<TrustRule>(),
            Ok(TrustRule::Addr("10.0.0.1".parse().expect("ip")))
        );
        assert!("cgroup:relative".parse::<TrustRule>().is_err());
        assert!("addr:nope".parse::<TrustRule>().is_err());
        assert!("10.0.0.1".parse::<TrustRule>().is_err());
    }

    #[test]
    fn a_container_speaks_for_the_host_pids_of_its_own_container_only() {
        let root = std::env::temp_dir().join(format!("sender-proc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (pid, container) in [(500, C1), (600, C2)] {
            fs::create_dir_all(root.join(pid.to_string())).expect("mkdir");
            fs::write(
                root.join(pid.to_string()).join("cgroup"),
                format!("0::/system.slice/docker-{container}.scope\n"),
            )
            .expect("write");
        }
        let mut b = Binder::off();
        b.proc_root = root.clone();
        // 500 shares the sender's container, 600 is another's, 700 does not exist.
        let bound = b.bind_request(
            &sender(100, Some(C1)),
            request(&[(Some(500), None), (Some(600), None), (Some(700), None)]),
        );
        assert_eq!(bound.refused.claims, 2);
        assert_eq!(bound.spans.len(), 1);
        assert_eq!(bound.spans[0].pid, Some(500));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn cgroup_rules_match_the_cgroup_and_below_only() {
        let rules = parse_rules(&["cgroup:/system.slice/otelcol.service".into()]).expect("rules");
        assert!(cgroup_trusted("/system.slice/otelcol.service", &rules));
        assert!(cgroup_trusted(
            "/system.slice/otelcol.service/worker",
            &rules
        ));
        assert!(!cgroup_trusted("/system.slice/otelcol.service2", &rules));
        assert!(!cgroup_trusted("/system.slice", &rules));
        let addr = parse_rules(&["addr:10.0.0.7".into()]).expect("rules");
        assert!(!cgroup_trusted("/system.slice/otelcol.service", &addr));
    }

    #[test]
    fn unnamed_spans_bind_to_the_sender_and_foreign_claims_are_refused() {
        let b = Binder::off();
        let bound = b.bind_request(
            &sender(100, None),
            request(&[
                (None, None),
                (Some(100), None),
                // Another host process: a host sender speaks for itself only.
                (Some(1), None),
                // A container the sender is not in.
                (Some(1), Some(C1)),
            ]),
        );
        assert_eq!(
            bound.refused,
            Refused {
                unidentified: 0,
                claims: 2
            }
        );
        assert_eq!(bound.spans.len(), 2);
        assert!(bound.spans.iter().all(|s| s.pid == Some(100)));
        assert!(
            bound
                .spans
                .iter()
                .all(|s| s.sender.is_some_and(|x| x.pid == 100))
        );
        let (forwarded, pids) = bound.forward.expect("the accepted part is forwarded");
        assert_eq!(forwarded.resource_spans.len(), 2);
        assert_eq!(pids, vec![Some(100), Some(100)]);
    }

    #[test]
    fn a_container_speaks_for_its_own_namespace_pids_only() {
        let b = Binder::off();
        let bound = b.bind_request(
            &sender(100, Some(C1)),
            request(&[(Some(1), Some(C1)), (Some(1), Some(C2))]),
        );
        assert_eq!(bound.refused.claims, 1);
        assert_eq!(bound.spans.len(), 1);
        assert_eq!(
            bound.spans[0]
                .pid_scope
                .as_ref()
                .and_then(|p| p.container_id.as_deref()),
            Some(C1)
        );
    }

    #[test]
    fn unidentified_senders_are_refused_whole_and_trusted_ones_believed() {
        let b = Binder::off();
        let bound = b.bind_request(
            &Sender::Unidentified,
            request(&[(None, None), (Some(1), None)]),
        );
        assert!(bound.spans.is_empty());
        assert!(bound.forward.is_none());
        assert_eq!(bound.refused.unidentified, 2);
        let bound = b.bind_request(
            &Sender::Trusted(None),
            request(&[(Some(1), Some(C2)), (Some(7), None)]),
        );
        assert_eq!(bound.refused.total(), 0);
        assert_eq!(bound.spans[0].pid, Some(1));
        // A namespace pid is not a host pid: nothing is looked up for it.
        assert_eq!(bound.forward.expect("forwarded").1, vec![None, Some(7)]);
        let bound = b.bind_request(&Sender::Unchecked, request(&[(Some(1), None)]));
        assert_eq!(bound.spans[0].sender, None);
    }
}
