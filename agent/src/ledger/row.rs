//! A record to and from its row in `records` (plus its identity's columns).

use std::path::Path;

use rusqlite::{Row, Statement, ToSql, types::ValueRef};
use rust_decimal::Decimal;

use super::{
    CGROUP_ID, FIELDS, LedgerError, PID, PPID, bits_u64, corrupt, exact::DecBlob, overflow,
    record_err, sql, times::format_ns,
};
use crate::report::record::{Cost, TokenUsage, UsageRecord, Workload};

pub(super) const INSERT_RECORD: &str = "INSERT INTO records (ws_ns, record_id, we_ns, ident, \
     cpu_core_seconds, memory_gb_seconds, gpu_seconds, gpu_memory_gb_seconds, \
     network_rx_bytes, network_tx_bytes, disk_read_bytes, disk_write_bytes, storage_bytes, \
     syscalls, tokens, tokens_input, tokens_cache_read_input, tokens_output, \
     tokens_reasoning_output, currency, pricing_version, cost_cpu, cost_memory, cost_gpu, \
     cost_network, cost_storage, cost_token, cost_subtotal, cost_discount, cost_total, \
     gpu_energy_joules, gpu_attribution) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
     ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32) \
     ON CONFLICT (ws_ns, record_id) DO NOTHING";

/// Inserts one record's row; returns 0 when it was already there.
pub(super) fn insert_record(
    stmt: &mut Statement<'_>,
    path: &Path,
    r: &UsageRecord,
    ws: i64,
    we: i64,
    ident: i64,
) -> Result<usize, LedgerError> {
    let int = |field: &'static str, value: u64| {
        i64::try_from(value).map_err(|_| LedgerError::OutOfRange {
            record_id: r.record_id.clone(),
            field,
            value,
        })
    };
    let mut token_sums = [0u64; 4];
    for t in &r.tokens {
        for (sum, v) in
            token_sums
                .iter_mut()
                .zip([t.input, t.cache_read_input, t.output, t.reasoning_output])
        {
            *sum = sum
                .checked_add(v)
                .ok_or_else(|| overflow(&format!("record {} tokens", r.record_id)))?;
        }
    }
    let tokens = if r.tokens.is_empty() {
        None
    } else {
        Some(
            serde_json::to_string(&r.tokens).map_err(|source| LedgerError::Encode {
                record_id: r.record_id.clone(),
                source,
            })?,
        )
    };
    let cost = r.cost.as_ref();
    let dec = |f: fn(&Cost) -> &Decimal| cost.and_then(|c| DecBlob::of(f(c)));
    let bind_err = record_err(path, &r.record_id, "storing it");
    let values: [&dyn ToSql; 32] = [
        &ws,
        &r.record_id,
        &we,
        &ident,
        &DecBlob::of(&r.cpu_core_seconds),
        &DecBlob::of(&r.memory_gb_seconds),
        &DecBlob::of(&r.gpu_seconds),
        &DecBlob::of(&r.gpu_memory_gb_seconds),
        &int("network_rx_bytes", r.network_rx_bytes)?,
        &int("network_tx_bytes", r.network_tx_bytes)?,
        &int("disk_read_bytes", r.disk_read_bytes)?,
        &int("disk_write_bytes", r.disk_write_bytes)?,
        &r.storage_bytes
            .map(|v| int("storage_bytes", v))
            .transpose()?,
        &int("syscalls", r.syscalls)?,
        &tokens,
        &int("tokens", token_sums[0])?,
        &int("tokens", token_sums[1])?,
        &int("tokens", token_sums[2])?,
        &int("tokens", token_sums[3])?,
        &cost.map(|c| c.currency.as_str()),
        &cost.map(|c| c.pricing_version.as_str()),
        &dec(|c| &c.cpu),
        &dec(|c| &c.memory),
        &dec(|c| &c.gpu),
        &dec(|c| &c.network),
        &dec(|c| &c.storage),
        &dec(|c| &c.token),
        &dec(|c| &c.subtotal),
        &dec(|c| &c.discount),
        &dec(|c| &c.total),
        &DecBlob::of(&r.gpu_energy_joules),
        &r.gpu_attribution,
    ];
    for (i, v) in values.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, v).map_err(&bind_err)?;
    }
    stmt.raw_execute().map_err(bind_err)
}

/// The columns `record_from_row` reads, from `records r` and `identities i`.
pub(super) fn record_columns() -> String {
    let ids: Vec<String> = FIELDS.iter().map(|f| format!("i.{f}")).collect();
    format!(
        "r.ws_ns, r.record_id, r.we_ns, r.cpu_core_seconds, r.memory_gb_seconds, r.gpu_seconds, \
         r.gpu_memory_gb_seconds, r.network_rx_bytes, r.network_tx_bytes, r.disk_read_bytes, \
         r.disk_write_bytes, r.storage_bytes, r.syscalls, r.tokens, r.currency, \
         r.pricing_version, r.cost_cpu, r.cost_memory, r.cost_gpu, r.cost_network, \
         r.cost_storage, r.cost_token, r.cost_subtotal, r.cost_discount, r.cost_total, \
         r.gpu_energy_joules, r.gpu_attribution, {}",
        ids.join(", ")
    )
}

/// Rebuilds a record from the columns of [`record_columns`].
pub(super) fn record_from_row(row: &Row<'_>, path: &Path) -> Result<UsageRecord, LedgerError> {
    let e = sql(path, "reading a record");
    let record_id: String = row.get(1).map_err(&e)?;
    let bad = |what: &str| corrupt(path, format!("record {record_id}: {what}"));
    let time = |i: usize, what: &str| -> Result<String, LedgerError> {
        let ns: i64 = row.get(i).map_err(&e)?;
        format_ns(ns).ok_or_else(|| bad(what))
    };
    let dec = |i: usize| -> Result<Decimal, LedgerError> {
        match row.get_ref(i).map_err(&e)? {
            ValueRef::Null => Ok(Decimal::ZERO),
            ValueRef::Blob(b) => DecBlob::decode(Some(b)).ok_or_else(|| bad("a decimal")),
            _ => Err(bad("a decimal is not a blob")),
        }
    };
    let uint = |i: usize| -> Result<u64, LedgerError> {
        let v: i64 = row.get(i).map_err(&e)?;
        u64::try_from(v).map_err(|_| bad("a negative count"))
    };
    let text = |i: usize| -> Result<Option<String>, LedgerError> { row.get(i).map_err(&e) };
    let small = |i: usize| -> Result<Option<u32>, LedgerError> {
        let v: Option<i64> = row.get(i).map_err(&e)?;
        v.map(|v| u32::try_from(v).map_err(|_| bad("a pid out of range")))
            .transpose()
    };
    let tokens: Vec<TokenUsage> = match text(13)? {
        None => Vec::new(),
        Some(s) => serde_json::from_str(&s).map_err(|err| bad(&format!("tokens: {err}")))?,
    };
    let cost = match text(14)? {
        None => None,
        Some(currency) => Some(Cost {
            cpu: dec(16)?,
            memory: dec(17)?,
            gpu: dec(18)?,
            network: dec(19)?,
            storage: dec(20)?,
            token: dec(21)?,
            subtotal: dec(22)?,
            discount: dec(23)?,
            total: dec(24)?,
            currency,
            pricing_version: text(15)?.unwrap_or_default(),
        }),
    };
    let storage_bytes: Option<i64> = row.get(11).map_err(&e)?;
    // Identity columns start at 27, in FIELDS order.
    let f = |k: usize| 27 + k;
    Ok(UsageRecord {
        window_start: time(0, "window_start")?,
        window_end: time(2, "window_end")?,
        cpu_core_seconds: dec(3)?,
        memory_gb_seconds: dec(4)?,
        gpu_seconds: dec(5)?,
        gpu_memory_gb_seconds: dec(6)?,
        gpu_energy_joules: dec(25)?,
        gpu_attribution: text(26)?,
        network_rx_bytes: uint(7)?,
        network_tx_bytes: uint(8)?,
        disk_read_bytes: uint(9)?,
        disk_write_bytes: uint(10)?,
        storage_bytes: storage_bytes
            .map(|v| u64::try_from(v).map_err(|_| bad("a negative storage_bytes")))
            .transpose()?,
        syscalls: uint(12)?,
        tokens,
        cost,
        node: text(f(0))?.unwrap_or_default(),
        record_kind: text(f(1))?.unwrap_or_default(),
        workload_kind: text(f(2))?,
        pid: small(f(PID))?,
        ppid: small(f(PPID))?,
        process_start_time: text(f(5))?,
        comm: text(f(6))?,
        exe: text(f(7))?,
        cgroup_id: row
            .get::<_, Option<i64>>(f(CGROUP_ID))
            .map_err(&e)?
            .map(bits_u64),
        cgroup_path: text(f(9))?,
        workload: Workload {
            container_id: text(f(10))?,
            container_runtime: text(f(11))?,
            pod_uid: text(f(12))?,
            k8s_namespace: text(f(13))?,
            k8s_pod_name: text(f(14))?,
            wasm_module: text(f(15))?,
        },
        context: crate::identity::run::RunContext {
            agent_id: text(f(16))?,
            flow_id: text(f(17))?,
            run_id: text(f(18))?,
            user_id: text(f(19))?,
            project_id: text(f(20))?,
            customer_id: text(f(21))?,
            trace_id: text(f(22))?,
        },
        record_id,
    })
}
