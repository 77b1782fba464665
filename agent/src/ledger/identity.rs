//! Identities: each distinct identity/trace-context tuple stored once, so
//! records carry an integer instead of their names.

use std::{collections::HashMap, path::Path};

use rusqlite::{
    ToSql, Transaction,
    types::{ToSqlOutput, ValueRef},
};

use super::{FIELDS, IDENTITY_CACHE_MAX, LedgerError, N_FIELDS, record_err, u64_bits};
use crate::{
    identity::run::RunContext,
    report::record::{UsageRecord, Workload},
};

/// One identity column's value, borrowed from a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ValRef<'a> {
    Null,
    Int(i64),
    Text(&'a str),
}

/// One identity column's value, owned (for the cache).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Val {
    Null,
    Int(i64),
    Text(Box<str>),
}

impl ValRef<'_> {
    fn text(v: &Option<String>) -> ValRef<'_> {
        v.as_deref().map_or(ValRef::Null, ValRef::Text)
    }

    fn int(v: Option<i64>) -> ValRef<'static> {
        v.map_or(ValRef::Null, ValRef::Int)
    }

    fn owned(self) -> Val {
        match self {
            ValRef::Null => Val::Null,
            ValRef::Int(i) => Val::Int(i),
            ValRef::Text(t) => Val::Text(t.into()),
        }
    }

    fn eq_owned(self, v: &Val) -> bool {
        match (self, v) {
            (ValRef::Null, Val::Null) => true,
            (ValRef::Int(a), Val::Int(b)) => a == *b,
            (ValRef::Text(a), Val::Text(b)) => a == &**b,
            _ => false,
        }
    }

    fn eq_sql(self, v: ValueRef<'_>) -> bool {
        match (self, v) {
            (ValRef::Null, ValueRef::Null) => true,
            (ValRef::Int(a), ValueRef::Integer(b)) => a == b,
            (ValRef::Text(a), ValueRef::Text(b)) => a.as_bytes() == b,
            _ => false,
        }
    }
}

impl ToSql for ValRef<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            ValRef::Null => ValueRef::Null,
            ValRef::Int(i) => ValueRef::Integer(i),
            ValRef::Text(t) => ValueRef::Text(t.as_bytes()),
        }))
    }
}

/// A record's identity: its values of [`FIELDS`], in order.
///
/// The destructuring is exhaustive on purpose: a field added to
/// `UsageRecord` fails to compile here until the ledger decides where it is
/// stored (an identity column, or a record column in `insert_record`).
pub(super) fn identity_of(r: &UsageRecord) -> [ValRef<'_>; N_FIELDS] {
    let UsageRecord {
        record_id: _,
        node,
        window_start: _,
        window_end: _,
        record_kind,
        workload_kind,
        pid,
        process_start_time,
        ppid,
        comm,
        exe,
        cgroup_id,
        cgroup_path,
        workload:
            Workload {
                container_id,
                container_runtime,
                pod_uid,
                k8s_namespace,
                k8s_pod_name,
                wasm_module,
            },
        context:
            RunContext {
                agent_id,
                flow_id,
                run_id,
                user_id,
                project_id,
                customer_id,
                trace_id,
            },
        cpu_core_seconds: _,
        memory_gb_seconds: _,
        gpu_seconds: _,
        gpu_memory_gb_seconds: _,
        gpu_energy_joules: _,
        gpu_attribution: _,
        network_rx_bytes: _,
        network_tx_bytes: _,
        disk_read_bytes: _,
        disk_write_bytes: _,
        storage_bytes: _,
        syscalls: _,
        tokens: _,
        cost: _,
    } = r;
    [
        ValRef::Text(node),
        ValRef::Text(record_kind),
        ValRef::text(workload_kind),
        ValRef::int(pid.map(i64::from)),
        ValRef::int(ppid.map(i64::from)),
        ValRef::text(process_start_time),
        ValRef::text(comm),
        ValRef::text(exe),
        ValRef::int(cgroup_id.map(u64_bits)),
        ValRef::text(cgroup_path),
        ValRef::text(container_id),
        ValRef::text(container_runtime),
        ValRef::text(pod_uid),
        ValRef::text(k8s_namespace),
        ValRef::text(k8s_pod_name),
        ValRef::text(wasm_module),
        ValRef::text(agent_id),
        ValRef::text(flow_id),
        ValRef::text(run_id),
        ValRef::text(user_id),
        ValRef::text(project_id),
        ValRef::text(customer_id),
        ValRef::text(trace_id),
    ]
}

/// FNV-1a 64 of an identity, with type tags and lengths so no two differ
/// only in where one value ends. Stored, so it must never change.
pub(super) fn identity_hash(id: &[ValRef<'_>]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for v in id {
        match v {
            ValRef::Null => eat(&[0]),
            ValRef::Int(i) => {
                eat(&[1]);
                eat(&i.to_le_bytes());
            }
            ValRef::Text(t) => {
                eat(&[2]);
                eat(&(t.len() as u64).to_le_bytes());
                eat(t.as_bytes());
            }
        }
    }
    u64_bits(h)
}

/// An identity's values, owned.
pub(super) type IdentityKey = Box<[Val]>;

/// Identities by hash, with how many.
type ByHash = HashMap<i64, Vec<(IdentityKey, i64)>>;

/// Identity ids already durable in the db, by hash, in two generations: an
/// identity used since the last turn is in `current`; one used only before
/// it is in `previous`, and goes at the next turn unless used again. So
/// after a burst of short-lived processes their identities leave the cache
/// within two turns, and what stays is what is still metered (issue 13: a
/// cache cleared only when full kept up to 16,384 exited processes' for ever).
#[derive(Default)]
pub(super) struct IdentityCache {
    current: ByHash,
    current_len: usize,
    previous: ByHash,
}

impl IdentityCache {
    /// The id of identity `id`, and whether it must be inserted again (it
    /// was found only in the previous generation).
    fn get(&self, hash: i64, id: &[ValRef<'_>]) -> Option<(i64, bool)> {
        let find = |m: &ByHash| {
            m.get(&hash)?
                .iter()
                .find(|(k, _)| same_identity(k, id))
                .map(|(_, v)| *v)
        };
        find(&self.current)
            .map(|v| (v, false))
            .or_else(|| find(&self.previous).map(|v| (v, true)))
    }

    pub(super) fn insert(&mut self, hash: i64, key: IdentityKey, id: i64) {
        if self.current_len >= IDENTITY_CACHE_MAX {
            self.turn();
        }
        let slot = self.current.entry(hash).or_default();
        if !slot.iter().any(|(_, v)| *v == id) {
            slot.push((key, id));
            self.current_len += 1;
        }
    }

    /// Starts a new generation: what was not used since the last turn is
    /// forgotten (new maps, so the old capacity is given back).
    pub(super) fn turn(&mut self) {
        self.previous = std::mem::take(&mut self.current);
        self.current_len = 0;
    }

    /// Identities held, both generations.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        let count = |m: &ByHash| m.values().map(Vec::len).sum::<usize>();
        count(&self.current) + count(&self.previous)
    }
}

fn same_identity(k: &[Val], id: &[ValRef<'_>]) -> bool {
    k.len() == id.len() && k.iter().zip(id).all(|(a, b)| b.eq_owned(a))
}

/// The id of `r`'s identity row, inserting one if new. Rows found or made
/// in this transaction go to `fresh`, to be cached after the commit.
pub(super) fn resolve_identity(
    tx: &Transaction<'_>,
    path: &Path,
    cache: &IdentityCache,
    fresh: &mut Vec<(i64, IdentityKey, i64)>,
    r: &UsageRecord,
) -> Result<i64, LedgerError> {
    let id = identity_of(r);
    let hash = identity_hash(&id);
    match cache.get(hash, &id) {
        Some((found, false)) => return Ok(found),
        // Used again: into the current generation after the commit.
        Some((found, true)) => {
            if !fresh.iter().any(|(_, _, i)| *i == found) {
                fresh.push((hash, id.iter().map(|v| v.owned()).collect(), found));
            }
            return Ok(found);
        }
        None => {}
    }
    if let Some((_, _, found)) = fresh
        .iter()
        .find(|(h, k, _)| *h == hash && same_identity(k, &id))
    {
        return Ok(*found);
    }
    let err = |what| record_err(path, &r.record_id, what);
    let mut lookup = tx
        .prepare_cached(&format!(
            "SELECT id, {} FROM identities WHERE hash = ?1",
            FIELDS.join(", ")
        ))
        .map_err(err("preparing the identity lookup"))?;
    let mut rows = lookup
        .query([hash])
        .map_err(err("looking up its identity"))?;
    let mut found = None;
    while let Some(row) = rows.next().map_err(err("looking up its identity"))? {
        let mut same = true;
        for (k, v) in id.iter().enumerate() {
            let stored = row.get_ref(k + 1).map_err(err("looking up its identity"))?;
            if !v.eq_sql(stored) {
                same = false;
                break;
            }
        }
        if same {
            found = Some(
                row.get::<_, i64>(0)
                    .map_err(err("looking up its identity"))?,
            );
            break;
        }
    }
    drop(rows);
    let ident = match found {
        Some(i) => i,
        None => {
            let placeholders: Vec<String> = (1..=N_FIELDS + 1).map(|i| format!("?{i}")).collect();
            let mut insert = tx
                .prepare_cached(&format!(
                    "INSERT INTO identities (hash, {}) VALUES ({})",
                    FIELDS.join(", "),
                    placeholders.join(", ")
                ))
                .map_err(err("preparing the identity insert"))?;
            insert
                .raw_bind_parameter(1, hash)
                .map_err(err("storing its identity"))?;
            for (k, v) in id.iter().enumerate() {
                insert
                    .raw_bind_parameter(k + 2, v)
                    .map_err(err("storing its identity"))?;
            }
            insert.raw_execute().map_err(err("storing its identity"))?;
            tx.last_insert_rowid()
        }
    };
    fresh.push((hash, id.iter().map(|v| v.owned()).collect(), ident));
    Ok(ident)
}
