//! One module per hook family.

pub mod floor;
pub mod lifecycle;
pub mod sched;
pub mod syscalls;
