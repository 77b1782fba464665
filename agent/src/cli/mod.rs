//! The commands other than `run`: one file per command, plus how records are
//! printed (`output`).
//!
//! `record` meters for a while and prints; `usage` queries a running agent's
//! API; `top` shows it live; `check` lists what the kernel offers the agent; `pricing` makes
//! price books.

pub mod alerts;
pub mod check;
pub mod output;
pub mod pricing;
pub mod record;
pub mod top;
pub mod top_draw;
pub mod usage;
