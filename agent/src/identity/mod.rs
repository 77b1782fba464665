//! Who a process is: stage 2's helper, asked by `collect` when a process is
//! first seen.
//!
//! In: a pid and what procfs, the cgroup tree and the node's pod list say of
//! it. Out: its instance key and start time (`process`), its container, pod,
//! WASM runtime or plain-process identity (`workload`), its pod's name
//! (`pods`), and the run context (`run`) its environment names (`env`). Everything
//! read here is hostile input: readers return `None`, never fail a tick.

pub mod env;
pub mod pods;
pub mod process;
pub mod run;
pub mod workload;
