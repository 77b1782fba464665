//! Alert states in the ledger (schema V6), and the narrow reads alert
//! evaluation needs besides [`Ledger::totals`].
//!
//! In: alert states as opaque JSON bodies with their key columns (the ledger
//! does not know the alert stage's types: data flows one way). Out: the same
//! bodies, filtered; the customers and projects a group's records belong to
//! (for inhibition); month bounds (for budgets).

use rusqlite::{OptionalExtension, params};

use super::{FIELDS, Ledger, LedgerError, field_index, sql, times::month_bounds};

/// One alert state row to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRow {
    /// Stable hash of (rule, group key).
    pub fingerprint: String,
    /// The rule's name.
    pub rule: String,
    /// `pending`, `firing` or `resolved`.
    pub state: String,
    /// When it last changed (ns since the epoch).
    pub updated_ns: i64,
    /// The whole state, JSON.
    pub body: String,
}

/// A group's (customer_id, project_id), each where its records name one.
pub type Parents = (Option<String>, Option<String>);

/// Start of the UTC calendar month `ns` lies in, and of the next one.
pub fn month_of(ns: i64) -> Option<(i64, i64)> {
    month_bounds(ns)
}

impl Ledger {
    /// Every stored alert state's body (the engine's state at start).
    pub fn alert_bodies(&self) -> Result<Vec<String>, LedgerError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare("SELECT body FROM alert_states ORDER BY fingerprint")
            .map_err(sql(path, "reading alert states"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql(path, "reading alert states"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql(path, "reading alert states"))
    }

    /// Alert states filtered by state and rule, most recently changed first, at most `limit`.
    pub fn alert_list(
        &self,
        state: Option<&str>,
        rule: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, LedgerError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT body FROM alert_states \
                 WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR rule = ?2) \
                 ORDER BY updated_ns DESC, fingerprint LIMIT ?3",
            )
            .map_err(sql(path, "listing alerts"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![state, rule, limit], |r| r.get::<_, String>(0))
            .map_err(sql(path, "listing alerts"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql(path, "listing alerts"))
    }

    /// Writes changed alert states and deletes forgotten ones, in one transaction.
    pub fn save_alert_states(
        &mut self,
        upserts: &[AlertRow],
        deletes: &[String],
    ) -> Result<(), LedgerError> {
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(sql(&path, "saving alert states"))?;
        {
            let mut up = tx
                .prepare_cached(
                    "INSERT INTO alert_states (fingerprint, rule, state, updated_ns, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (fingerprint) DO UPDATE SET \
                     rule = excluded.rule, state = excluded.state, \
                     updated_ns = excluded.updated_ns, body = excluded.body",
                )
                .map_err(sql(&path, "saving alert states"))?;
            for r in upserts {
                up.execute(params![
                    r.fingerprint,
                    r.rule,
                    r.state,
                    r.updated_ns,
                    r.body
                ])
                .map_err(sql(&path, "saving alert states"))?;
            }
            let mut del = tx
                .prepare_cached("DELETE FROM alert_states WHERE fingerprint = ?1")
                .map_err(sql(&path, "deleting alert states"))?;
            for f in deletes {
                del.execute(params![f])
                    .map_err(sql(&path, "deleting alert states"))?;
            }
        }
        tx.commit().map_err(sql(&path, "saving alert states"))
    }

    /// The distinct (customer_id, project_id) of the identities whose `field` is `value`, at most `limit`.
    pub fn group_parents(
        &self,
        field: &str,
        value: &str,
        limit: usize,
    ) -> Result<Vec<Parents>, LedgerError> {
        let i = field_index(field)?;
        let path = &self.path;
        let query = format!(
            "SELECT DISTINCT customer_id, project_id FROM identities WHERE {} = ?1 LIMIT ?2",
            FIELDS[i]
        );
        let mut stmt = self
            .conn
            .prepare_cached(&query)
            .map_err(sql(path, "reading a group's customers"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![value, limit], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql(path, "reading a group's customers"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql(path, "reading a group's customers"))
    }

    /// The end of the newest committed window, in ns (None: none yet).
    pub fn last_window_end_ns(&self) -> Result<Option<i64>, LedgerError> {
        self.conn
            .query_row("SELECT MAX(we_ns) FROM windows", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()
            .map(Option::flatten)
            .map_err(sql(&self.path, "reading the last window"))
    }
}
