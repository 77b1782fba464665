//! The last stage: what leaves the agent.
//!
//! In: windows committed to the `ledger` (and the ledger's queries). Out: the
//! read-only HTTP API (`api`), Prometheus counters (`prometheus`), and OTLP
//! metrics export from the ledger's outbox (`export`).

pub mod api;
pub mod export;
pub mod prometheus;
