//! Rate-limited warnings: a flood of bad input must not become a flood of log
//! lines (one per kind per minute; counters carry the exact numbers).

use std::{
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

/// The kinds of trouble a warning is rate limited by (`Unidentified` stays
/// last: [`WARN_KINDS`] counts from it).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Warn {
    Malformed,
    TooLarge,
    Unsupported,
    Timeout,
    InvalidIds,
    PendingFull,
    Accept,
    ForwardQueueFull,
    ForwardFailed,
    BadTimes,
    OverQuota,
    Busy,
    Unidentified,
}

/// One slot per [`Warn`] kind: the last variant's index plus one, so a kind
/// added to the enum always has its slot.
pub(crate) const WARN_KINDS: usize = Warn::Unidentified as usize + 1;
pub(crate) const WARN_EVERY_S: u64 = 60;

pub(crate) static WARN_EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
/// Per kind, seconds since `WARN_EPOCH` (plus one; 0: never) of the last warning.
pub(crate) static LAST_WARN: [AtomicU64; WARN_KINDS] = [const { AtomicU64::new(0) }; WARN_KINDS];

/// Whether a warning of `kind` may be logged now (one per kind per minute).
pub(crate) fn warn_allowed(kind: Warn) -> bool {
    let now = WARN_EPOCH.elapsed().as_secs() + 1;
    let Some(slot) = LAST_WARN.get(kind as usize) else {
        return true;
    };
    let last = slot.load(Ordering::Relaxed);
    (last == 0 || now >= last + WARN_EVERY_S)
        && slot
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}
