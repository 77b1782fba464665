//! One module per hook family.

pub mod floor;
pub mod lifecycle;
pub mod net;
pub mod sched;
pub mod syscalls;
