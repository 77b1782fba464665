//! Times: RFC 3339 text at the API, integer ns since the epoch in the db
//! (RFC 3339 text does not sort: `…:00Z` > `…:00.5Z`).

use time::{Date, Month, OffsetDateTime, format_description::well_known::Rfc3339};

use super::{HOUR_NS, LedgerError};

/// RFC 3339 → ns since the epoch.
pub(super) fn parse_time(what: &str, s: &str) -> Result<i64, LedgerError> {
    let bad = |reason: String| LedgerError::BadTime {
        what: what.to_string(),
        value: s.to_string(),
        reason,
    };
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| bad(e.to_string()))?;
    i64::try_from(t.unix_timestamp_nanos()).map_err(|_| bad("out of range".into()))
}

/// ns since the epoch → canonical RFC 3339 (UTC, `Z`, no trailing zeros).
pub(super) fn format_ns(ns: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// The error for a time (in ns) with no calendar month.
pub(super) fn bad_ns(what: &str, ns: i64) -> LedgerError {
    LedgerError::BadTime {
        what: what.to_string(),
        value: ns.to_string(),
        reason: "no calendar month".into(),
    }
}

/// The wall clock now, in ns since the epoch.
pub(super) fn now_ns() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

/// The start of the UTC hour `ns` lies in.
pub(super) fn floor_hour(ns: i64) -> i64 {
    ns.div_euclid(HOUR_NS) * HOUR_NS
}

/// Start of `ns`'s UTC calendar month, and of the next one.
pub(super) fn month_bounds(ns: i64) -> Option<(i64, i64)> {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns)).ok()?;
    let start = Date::from_calendar_date(t.year(), t.month(), 1).ok()?;
    let (y, m) = match t.month() {
        Month::December => (t.year() + 1, Month::January),
        m => (t.year(), m.next()),
    };
    let next = Date::from_calendar_date(y, m, 1).ok()?;
    let ns_of = |d: Date| i64::try_from(d.midnight().assume_utc().unix_timestamp_nanos()).ok();
    Some((ns_of(start)?, ns_of(next)?))
}

/// Parses a window time once per distinct string (a window's records share them).
#[derive(Default)]
pub(super) struct TimeCache {
    last: Option<(String, i64)>,
}

impl TimeCache {
    /// `s` in ns; `what` names it in the error.
    pub(super) fn parse(
        &mut self,
        s: &str,
        what: impl FnOnce() -> String,
    ) -> Result<i64, LedgerError> {
        match &self.last {
            Some((text, ns)) if text == s => return Ok(*ns),
            _ => {}
        }
        let ns = parse_time(&what(), s)?;
        self.last = Some((s.to_string(), ns));
        Ok(ns)
    }
}
