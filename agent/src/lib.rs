//! mentat-agent: meters what every process on a node consumes, with eBPF,
//! and attributes it exactly.
//!
//! Modules are the stages of the data flow (DESIGN.md), each a folder whose
//! opening comment says what comes in and what goes out; data flows one way:
//!
//! `probes` (kernel) → `collect` (windows, asking `identity` who a process
//! is) → `report` (usage records, split between runs by `context`'s spans) →
//! `pricing` → `ledger` (durable) → `alert` (rules over the ledger, notifications)
//! → `serve` (API, stream, Prometheus, OTLP export).
//!
//! `daemon` wires the stages for `mentat-agent run`; `cli` holds the other
//! commands; `config` is the daemon's configuration file.

pub mod alert;
pub mod cli;
pub mod collect;
pub mod config;
pub mod context;
pub mod daemon;
pub mod identity;
pub mod ledger;
pub mod pricing;
pub mod probes;
pub mod report;
pub mod serve;
