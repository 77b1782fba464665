//! The last stage: what leaves the agent.
//!
//! In: windows committed to the `ledger` (and the ledger's queries). Out: the
//! read-only HTTP API (`api`), Prometheus counters (`prometheus`), OTLP
//! metrics export from the ledger's outbox (`export`, `outbox`; the OTLP client setup in `otlp`), and the
//! cost attributes added to spans forwarded upstream (`enrich`).

pub mod api;
pub mod enrich;
pub mod export;
pub mod forward;
pub mod otlp;
pub mod outbox;
pub mod prometheus;
pub mod stream;
pub mod stream_http;
