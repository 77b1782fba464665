//! Exact running sums of the summed columns, from raw records and rollups.

use std::path::Path;

use rusqlite::{Row, types::ValueRef};
use rust_decimal::Decimal;

use super::{
    Cost, DEC_COLS, INT_COLS, LedgerError, Totals, corrupt,
    exact::{DecBlob, Exact},
    overflow, sql,
};

/// Currencies seen in one query, by index (there are one or two), so rows
/// are keyed without a string each.
#[derive(Default)]
pub(super) struct Currencies(Vec<String>);

impl Currencies {
    /// The index of column `col`'s currency; None for NULL (unpriced record)
    /// or '' (a rollup's key for unpriced records).
    pub(super) fn index(
        &mut self,
        row: &Row<'_>,
        col: usize,
        path: &Path,
    ) -> Result<Option<usize>, LedgerError> {
        match row.get_ref(col).map_err(sql(path, "reading a currency"))? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(b"") => Ok(None),
            ValueRef::Text(t) => Ok(Some(match self.0.iter().position(|c| c.as_bytes() == t) {
                Some(i) => i,
                None => {
                    self.0.push(String::from_utf8_lossy(t).into_owned());
                    self.0.len() - 1
                }
            })),
            _ => Err(corrupt(path, "a currency is not text")),
        }
    }

    /// The currency at index `i`.
    pub(super) fn name(&self, i: usize) -> String {
        self.0.get(i).cloned().unwrap_or_default()
    }
}

/// Whether a raw record is priced: its currency column is not NULL.
pub(super) fn is_priced(row: &Row<'_>, col: usize, path: &Path) -> Result<bool, LedgerError> {
    let v = row.get_ref(col).map_err(sql(path, "reading a currency"))?;
    Ok(!matches!(v, ValueRef::Null))
}

/// Exact running sums of every summed column.
#[derive(Clone, Debug, Default)]
pub(super) struct Acc {
    /// Records summed.
    pub(super) records: u64,
    /// Of which priced.
    pub(super) priced: u64,
    /// Sums of DEC_COLS.
    pub(super) dec: [Exact; DEC_COLS.len()],
    /// Sums of INT_COLS.
    pub(super) ints: [u64; 10],
}

impl Acc {
    /// Adds a raw record: DEC_COLS blobs from `first`, then INT_COLS.
    pub(super) fn add_raw(
        &mut self,
        row: &Row<'_>,
        first: usize,
        priced: bool,
        path: &Path,
    ) -> Result<(), LedgerError> {
        self.records = self
            .records
            .checked_add(1)
            .ok_or_else(|| overflow("records"))?;
        self.priced += u64::from(priced);
        for (k, name) in DEC_COLS.iter().enumerate() {
            let v = row
                .get_ref(first + k)
                .map_err(sql(path, "reading a record"))?;
            let e = blob_exact(v).ok_or_else(|| corrupt(path, format!("a stored {name}")))?;
            self.dec[k] = self.dec[k].checked_add(e).ok_or_else(|| overflow(name))?;
        }
        self.add_ints(row, first + DEC_COLS.len(), path)
    }

    /// Adds a rollup row: records, priced, DEC_COLS text from `first`, then INT_COLS.
    pub(super) fn add_rollup(
        &mut self,
        row: &Row<'_>,
        first: usize,
        path: &Path,
    ) -> Result<(), LedgerError> {
        let get_u64 = |i: usize, what: &str| -> Result<u64, LedgerError> {
            let v: i64 = row.get(i).map_err(sql(path, "reading a rollup"))?;
            u64::try_from(v).map_err(|_| corrupt(path, format!("rollup {what} = {v}")))
        };
        let records = get_u64(first, "records")?;
        let priced = get_u64(first + 1, "priced")?;
        self.records = self
            .records
            .checked_add(records)
            .ok_or_else(|| overflow("records"))?;
        self.priced = self
            .priced
            .checked_add(priced)
            .ok_or_else(|| overflow("records"))?;
        for (k, name) in DEC_COLS.iter().enumerate() {
            let s: String = row
                .get(first + 2 + k)
                .map_err(sql(path, "reading a rollup"))?;
            let e =
                Exact::parse(&s).ok_or_else(|| corrupt(path, format!("rollup {name} = {s:?}")))?;
            self.dec[k] = self.dec[k].checked_add(e).ok_or_else(|| overflow(name))?;
        }
        self.add_ints(row, first + 2 + DEC_COLS.len(), path)
    }

    fn add_ints(&mut self, row: &Row<'_>, first: usize, path: &Path) -> Result<(), LedgerError> {
        for (k, name) in INT_COLS.iter().enumerate() {
            let v: Option<i64> = row.get(first + k).map_err(sql(path, "reading a record"))?;
            let v = u64::try_from(v.unwrap_or(0))
                .map_err(|_| corrupt(path, format!("a negative {name}")))?;
            self.ints[k] = self.ints[k].checked_add(v).ok_or_else(|| overflow(name))?;
        }
        Ok(())
    }

    pub(super) fn merge(&mut self, o: &Acc) -> Result<(), LedgerError> {
        self.combine(
            o,
            u64::checked_add,
            Exact::checked_add,
            &overflow,
            "records",
        )
    }

    /// `self - o`, exactly: takes a part out of a record's or rollup's sums.
    pub(super) fn sub(&mut self, o: &Acc) -> Result<(), LedgerError> {
        self.combine(
            o,
            u64::checked_sub,
            Exact::checked_sub,
            &corrupt_sums,
            "priced records",
        )
    }

    /// `self op o`, field by field. A count or integer sum out of range is
    /// `out_of_range` of its name (`priced` names the priced count); a decimal
    /// sum out of range is an overflow.
    fn combine(
        &mut self,
        o: &Acc,
        int: fn(u64, u64) -> Option<u64>,
        dec: fn(Exact, Exact) -> Option<Exact>,
        out_of_range: &dyn Fn(&str) -> LedgerError,
        priced: &str,
    ) -> Result<(), LedgerError> {
        self.records = int(self.records, o.records).ok_or_else(|| out_of_range("records"))?;
        self.priced = int(self.priced, o.priced).ok_or_else(|| out_of_range(priced))?;
        for (k, name) in DEC_COLS.iter().enumerate() {
            self.dec[k] = dec(self.dec[k], o.dec[k]).ok_or_else(|| overflow(name))?;
        }
        for (k, name) in INT_COLS.iter().enumerate() {
            self.ints[k] = int(self.ints[k], o.ints[k]).ok_or_else(|| out_of_range(name))?;
        }
        Ok(())
    }

    /// Whether nothing at all was summed (no record, every sum zero).
    pub(super) fn is_zero(&self) -> bool {
        self.records == 0
            && self.dec.iter().all(|d| *d == Exact::ZERO)
            && self.ints.iter().all(|&v| v == 0)
    }

    /// The totals, each rounded to a `Decimal` once.
    pub(super) fn totals(&self, currency: Option<String>) -> Result<Totals, LedgerError> {
        let mut d = [Decimal::ZERO; DEC_COLS.len()];
        for (k, name) in DEC_COLS.iter().enumerate() {
            d[k] = self.dec[k].to_decimal().ok_or_else(|| overflow(name))?;
        }
        let [
            cpu_s,
            mem,
            gpu_s,
            gpu_mem,
            gpu_energy,
            cpu,
            memory,
            gpu,
            network,
            storage,
            token,
            subtotal,
            discount,
            total,
        ] = d;
        let [rx, tx, dr, dw, sb, sc, ti, tc, to, tr] = self.ints;
        Ok(Totals {
            records: self.records,
            priced_records: self.priced,
            cpu_core_seconds: cpu_s,
            memory_gb_seconds: mem,
            gpu_seconds: gpu_s,
            gpu_memory_gb_seconds: gpu_mem,
            gpu_energy_joules: gpu_energy,
            network_rx_bytes: rx,
            network_tx_bytes: tx,
            disk_read_bytes: dr,
            disk_write_bytes: dw,
            storage_bytes: sb,
            syscalls: sc,
            tokens_input: ti,
            tokens_cache_read_input: tc,
            tokens_output: to,
            tokens_reasoning_output: tr,
            cost: Cost {
                cpu,
                memory,
                gpu,
                network,
                storage,
                token,
                subtotal,
                discount,
                total,
                currency: String::new(),
                pricing_version: String::new(),
            },
            currency,
            token_types: None,
        })
    }
}

/// A part larger than the whole it is taken from: stored sums disagree.
fn corrupt_sums(what: &str) -> LedgerError {
    LedgerError::Corrupt {
        path: std::path::PathBuf::new(),
        what: format!("a model's {what} exceed the record's or rollup's"),
    }
}

/// The exact value of a stored decimal column (NULL is zero).
pub(super) fn blob_exact(v: ValueRef<'_>) -> Option<Exact> {
    match v {
        ValueRef::Null => Some(Exact::ZERO),
        ValueRef::Blob(b) => DecBlob::exact(Some(b)),
        _ => None,
    }
}
