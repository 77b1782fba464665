//! Kubernetes pod names and namespaces by pod UID, from the node's pod list.
//!
//! Optional: with a pod-list URL configured (the kubelet's `/pods`, or the
//! API server's `/api/v1/pods?fieldSelector=spec.nodeName={node}`), a
//! background thread fetches the list every `refresh` and keeps a UID →
//! (namespace, name) map. Lookups read that map and never wait for the
//! network, so a slow or absent API never delays a tick; a pod created since
//! the last fetch simply has no name until the next one.

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use serde::Deserialize;
use tracing::{debug, warn};

/// Where and how to fetch the pod list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodSource {
    /// The pod-list URL; `{node}` is replaced by the node name. Empty: off.
    pub url: String,
    /// A bearer token file (the ServiceAccount token), read at each fetch.
    pub token_file: Option<PathBuf>,
    /// A PEM CA bundle to verify the server (the ServiceAccount `ca.crt`).
    pub ca_file: Option<PathBuf>,
}

/// Why a pod list could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    /// The request failed.
    #[error("fetching the pod list from {url}: {message}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The response is not a pod list.
    #[error("the pod list from {url} is not valid: {source}")]
    Parse {
        /// The URL.
        url: String,
        /// What went wrong.
        source: serde_json::Error,
    },
    /// The token or CA file could not be read.
    #[error("reading {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: Meta,
}

#[derive(Deserialize)]
struct Meta {
    uid: String,
    name: String,
    #[serde(default)]
    namespace: String,
}

/// A pod's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// Parses a `PodList` JSON body into UID → name.
pub fn parse_pod_list(url: &str, body: &[u8]) -> Result<HashMap<String, PodName>, PodsError> {
    let list: PodList = serde_json::from_slice(body).map_err(|source| PodsError::Parse {
        url: url.to_string(),
        source,
    })?;
    Ok(list
        .items
        .into_iter()
        .map(|p| {
            (
                p.metadata.uid.to_ascii_lowercase(),
                PodName {
                    namespace: p.metadata.namespace,
                    name: p.metadata.name,
                },
            )
        })
        .collect())
}

/// The latest known pod names, kept fresh by a background thread.
#[derive(Clone, Debug, Default)]
pub struct PodDirectory {
    names: Arc<RwLock<HashMap<String, PodName>>>,
}

/// Pod-list fetches that failed (names stay as last fetched), since start.
pub fn list_failures() -> u64 {
    POD_LIST_FAILURES.load(Ordering::Relaxed)
}

static POD_LIST_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Asks the API server for object metadata only (a `PartialObjectMetadataList`):
/// the agent needs each pod's UID, name and namespace, and a full `PodList`
/// carries every container's environment values, secrets passed as env
/// included. The plain JSON fallback is for servers that do not serve the
/// metadata form (the kubelet's `/pods` returns the full list whatever is
/// asked); both parse the same, since only `metadata` is read.
const ACCEPT: &str =
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json;q=0.9";

/// Bodies larger than this are refused: a node's pod list is far smaller.
const MAX_BODY: u64 = 64 << 20;

impl PodDirectory {
    /// Starts refreshing from `source` every `refresh`; an empty URL gives a
    /// directory that never knows a name.
    pub fn start(source: PodSource, node: &str, refresh: Duration) -> Self {
        let dir = Self::default();
        if source.url.is_empty() {
            return dir;
        }
        let url = source.url.replace("{node}", node);
        let names = dir.names.clone();
        let spawned = thread::Builder::new().name("pods".into()).spawn(move || {
            let mut failing = false;
            loop {
                match fetch(&url, &source) {
                    Ok(map) => {
                        debug!(pods = map.len(), "pod list refreshed");
                        if let Ok(mut w) = names.write() {
                            *w = map;
                        }
                        failing = false;
                    }
                    // Counted each time; logged once per outage, not once per attempt.
                    Err(e) => {
                        POD_LIST_FAILURES.fetch_add(1, Ordering::Relaxed);
                        if !failing {
                            warn!(error = %e, "pod names unavailable; records keep the pod UID");
                            failing = true;
                        }
                    }
                }
                thread::sleep(refresh);
            }
        });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the pod-list thread; pod names unavailable");
        }
        dir
    }

    /// The pod with `uid`, if the last fetch knew it.
    pub fn lookup(&self, uid: &str) -> Option<PodName> {
        self.names.read().ok()?.get(uid).cloned()
    }
}

fn fetch(url: &str, source: &PodSource) -> Result<HashMap<String, PodName>, PodsError> {
    let fetch_err = |message: String| PodsError::Fetch {
        url: url.to_string(),
        message,
    };
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(ca) = &source.ca_file {
        let pem = fs::read(ca).map_err(|e| PodsError::File {
            path: ca.clone(),
            source: e,
        })?;
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(tls.build())
        .build()
        .into();
    let mut req = agent.get(url).header("Accept", ACCEPT);
    if let Some(path) = &source.token_file {
        let token = fs::read_to_string(path).map_err(|e| PodsError::File {
            path: path.clone(),
            source: e,
        })?;
        req = req.header("Authorization", format!("Bearer {}", token.trim()));
    }
    let mut resp = req.call().map_err(|e| fetch_err(e.to_string()))?;
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| fetch_err(e.to_string()))?;
    parse_pod_list(url, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_list_parses_uids_to_names() {
        let body = br#"{"kind":"PodList","items":[
            {"metadata":{"uid":"7C4E2A1B-3F5D-4E6A-9B8C-0D1E2F3A4B5C","name":"web-0","namespace":"shop"}},
            {"metadata":{"uid":"11111111-2222-3333-4444-555555555555","name":"db","namespace":"data"},"spec":{}}]}"#;
        let map = parse_pod_list("u", body).expect("parses");
        assert_eq!(
            map.get("7c4e2a1b-3f5d-4e6a-9b8c-0d1e2f3a4b5c"),
            Some(&PodName {
                namespace: "shop".into(),
                name: "web-0".into()
            })
        );
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn bad_pod_lists_name_the_url() {
        let e = parse_pod_list("http://x/pods", b"<html>").expect_err("not json");
        assert!(e.to_string().contains("http://x/pods"), "{e}");
        assert!(parse_pod_list("u", br#"{"items":[{"metadata":{}}]}"#).is_err());
    }

    /// Serves one HTTP request on loopback with `status` and `body`; returns
    /// the URL and a handle yielding the request's head.
    fn one_shot(status: u16, body: &'static str) -> (String, thread::JoinHandle<String>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/api/v1/pods?fieldSelector=spec.nodeName={{node}}",
            listener.local_addr().expect("addr")
        );
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            String::from_utf8_lossy(&head).into_owned()
        });
        (url, server)
    }

    #[test]
    fn asks_for_metadata_only_and_reads_a_partial_object_metadata_list() {
        // What an API server answers to the metadata Accept header: no spec, no env.
        let (url, server) = one_shot(
            200,
            r#"{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","metadata":{},
               "items":[{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1",
               "metadata":{"name":"web-0","namespace":"shop","uid":"7c4e2a1b-3f5d-4e6a-9b8c-0d1e2f3a4b5c"}}]}"#,
        );
        let map = fetch(&url.replace("{node}", "n1"), &PodSource::default()).expect("fetch");
        let head = server.join().expect("server");
        assert_eq!(
            map.get("7c4e2a1b-3f5d-4e6a-9b8c-0d1e2f3a4b5c")
                .map(|p| p.name.as_str()),
            Some("web-0")
        );
        let accept = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("accept: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        assert!(
            accept.starts_with("application/json;as=partialobjectmetadatalist;g=meta.k8s.io;v=v1"),
            "request head: {head}"
        );
        assert!(head.contains("spec.nodeName=n1"), "{head}");
    }

    #[test]
    fn failed_pod_lists_are_counted() {
        let (url, server) = one_shot(500, "{}");
        let before = list_failures();
        let _dir = PodDirectory::start(
            PodSource {
                url,
                ..PodSource::default()
            },
            "n1",
            Duration::from_secs(3600),
        );
        server.join().expect("server");
        // The count follows the response; poll rather than sleep a guessed time.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while list_failures() == before && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(list_failures() > before);
    }

    #[test]
    fn no_url_means_no_names_and_no_thread() {
        let dir = PodDirectory::start(PodSource::default(), "n", Duration::from_secs(1));
        assert_eq!(dir.lookup("anything"), None);
    }
}
