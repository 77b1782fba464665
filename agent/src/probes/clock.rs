//! Kernel time to wall-clock time at the edges.
//!
//! Everything the agent timestamps is CLOCK_BOOTTIME nanoseconds: what
//! `task_struct::start_boottime` (and so /proc/<pid>/stat) and
//! `bpf_ktime_get_boot_ns` use, so process start times from the kernel and
//! from procfs are on one clock. Unlike CLOCK_MONOTONIC it keeps counting
//! through suspend, so it maps to the wall clock with one offset.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Converts monotonic kernel timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock time at boot, in ns since the epoch.
    boot_wall_ns: i128,
}

impl Clock {
    /// Reads both clocks now to find their offset.
    pub fn new() -> Self {
        let mono = boottime_ns();
        let wall = wall_ns();
        Self {
            boot_wall_ns: wall - i128::from(mono),
        }
    }

    /// The wall-clock time of boot-time timestamp `mono_ns`.
    pub fn to_wall(&self, mono_ns: u64) -> SystemTime {
        let ns = self.boot_wall_ns + i128::from(mono_ns);
        let ns = u64::try_from(ns.max(0)).unwrap_or(u64::MAX);
        UNIX_EPOCH + Duration::from_nanos(ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_BOOTTIME now, in ns: the clock `bpf_ktime_get_boot_ns` reads.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_BOOTTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn wall_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// RFC 3339 in UTC with nanoseconds, e.g. `2026-11-24T22:52:11.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| String::from("invalid-time"))
}

/// A wall-clock time as Unix ns (0 before the epoch, saturating far after it).
pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Unix ns as RFC 3339 UTC.
pub fn rfc3339_of_ns(ns: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// An RFC 3339 time as Unix ns.
pub fn unix_ns_of(rfc3339: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(rfc3339, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

/// Durations in config files: humantime strings ("1s", "250ms", "1m"), for
/// `#[serde(with = "crate::probes::clock::duration_str")]`.
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_now_maps_to_wall_now() {
        let clock = Clock::new();
        let mapped = clock.to_wall(boottime_ns());
        let now = SystemTime::now();
        let diff = match now.duration_since(mapped) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        // Both clocks are read microseconds apart; 50 ms allows a loaded machine.
        assert!(diff < Duration::from_millis(50), "off by {diff:?}");
    }

    #[test]
    fn rfc3339_is_utc_with_nanoseconds() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123456789Z");
    }
}
