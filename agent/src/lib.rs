//! mentat-agent: meters what every process on a node consumes, with eBPF,
//! and attributes it exactly. Modules follow the data flow in DESIGN.md:
//! `probes` → `collect` (with `identity`) → `report` → `output` / `daemon` sinks.

pub mod api;
pub mod btf;
pub mod caps;
pub mod check;
pub mod clock;
pub mod collect;
pub mod config;
pub mod context;
pub mod daemon;
pub mod export;
pub mod gpu;
pub mod identity;
pub mod intake;
pub mod ledger;
pub mod memory;
pub mod output;
pub mod pods;
pub mod pricing;
pub mod probes;
pub mod prometheus;
pub mod query;
pub mod receiver;
pub mod record;
pub mod report;
pub mod sender;
pub mod spans;
pub mod storage;
pub mod syscalls;
pub mod usage;
pub mod workload;
