//! The pricing book: turns a usage record's raw quantities into the spec's
//! CostCalculator breakdown, in exact decimal money.
//!
//! # The formula (DESIGN.md, "The usage record")
//!
//! ```text
//! cpu      = cpu_core_seconds  × cpu_per_core_hour  / 3600
//! memory   = memory_gb_seconds × memory_per_gb_hour / 3600
//! gpu      = gpu_seconds       × gpu_per_hour       / 3600
//! network  = (rx + tx) bytes   × network.per_gb     / 1024³          (one price)
//!          = rx × rx_per_gb / 1024³ + tx × tx_per_gb / 1024³        (split by direction)
//! storage  = storage_bytes × storage_per_gb_month × window_seconds / (1024³ · 30 · 24 · 3600)
//! token    = Σ per call: Σ part × its price / 1000, where input and output are
//!            split into parts that add up to them exactly (cache read, cache
//!            write, per modality, reasoning, the rest; see `models`), at the
//!            model's long-context tier when the call's input exceeds one
//! subtotal = cpu + memory + gpu + network + storage + token
//! discount = subtotal × percent / 100   (percent of the tier holding month-to-date spend)
//! total    = subtotal − discount
//! ```
//!
//! Cached input is a subset of input and reasoning output a subset of output,
//! so neither is added on top: a cached token is billed once, at the cached
//! price, and a reasoning token once, at the reasoning price.
//!
//! # Exactness rules
//!
//! - Money and quantities are `rust_decimal::Decimal`, never `f64`. Prices are
//!   read from the book's text, never through a float: `0.1` in the file is
//!   exactly 0.1 (see [`PriceBook::parse`]).
//! - Each component is one product divided once, multiplying first, so the only
//!   rounding is `Decimal`'s own at 28 significant digits (or 28 decimal places):
//!   some 10⁻²⁰ of a cent, far below any currency's minor unit. Dividing by
//!   3600 or 1024³ is exact whenever the quotient fits in those digits.
//! - Nothing here rounds to cents. [`present`] rounds half-even to the
//!   currency's minor unit, and only for display.
//! - Every [`Cost`] names its book's `version`; the record keeps its raw
//!   quantities, so it can be re-priced with any later book.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Range,
    path::Path,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Deserialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use toml::Spanned;

use crate::report::record::{Cost, TokenUsage, UsageRecord};

pub mod litellm;
mod models;
mod text;

pub use models::{LongContext, ModelEntry, ModelPrice, Models};

/// Seconds in an hour: the divisor of every per-hour price.
const SECONDS_PER_HOUR: Decimal = Decimal::from_parts(3600, 0, 0, false, 0);
/// Bytes in a GiB (the spec's "GB" is 1024³ bytes).
const BYTES_PER_GB: Decimal = Decimal::from_parts(1 << 30, 0, 0, false, 0);
/// Seconds in the spec's billing month (30 days).
const SECONDS_PER_MONTH: Decimal = Decimal::from_parts(30 * 24 * 3600, 0, 0, false, 0);

/// The price book shipped with the agent, used when no `pricing_path` is set.
pub const DEFAULT_BOOK: &str = include_str!("../../../deploy/pricing.toml");

/// Why a price book was refused.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    /// The file could not be read.
    #[error("{origin}: cannot read the price book: {source}")]
    Read {
        /// The file.
        origin: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The book is malformed or breaks a rule; `line` is 1-based.
    #[error("{origin}:{line}: {reason}")]
    Invalid {
        /// The file.
        origin: String,
        /// The line the problem is on (1 for a missing top-level key).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A reload changed prices without changing `version`.
    #[error(
        "{origin}: prices differ from the book in force but version is still {version:?}; \
         give changed prices a new version so every cost names the prices that made it"
    )]
    VersionReused {
        /// The file.
        origin: String,
        /// The version both books claim.
        version: String,
    },
}

/// Network price: one for both directions, or one each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkPrice {
    /// `network.per_gb`: received plus sent bytes.
    PerGb(Decimal),
    /// `network.rx_per_gb` and `network.tx_per_gb`.
    Split {
        /// Per GiB received.
        rx_per_gb: Decimal,
        /// Per GiB sent.
        tx_per_gb: Decimal,
    },
}

/// A volume-discount tier: month-to-date spend in `[from, to)` gets `percent` off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Lower bound, inclusive.
    pub from: Decimal,
    /// Upper bound, exclusive; `None` on the last tier.
    pub to: Option<Decimal>,
    /// Percent off, 0..=100.
    pub percent: Decimal,
}

/// A validated price book.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceBook {
    version: String,
    currency: String,
    cpu_per_core_hour: Decimal,
    memory_per_gb_hour: Decimal,
    gpu_per_hour: Decimal,
    storage_per_gb_month: Decimal,
    network: NetworkPrice,
    models: Models,
    tiers: Vec<Tier>,
}

impl PriceBook {
    /// Reads and validates the book at `path`; errors name the path and line.
    pub fn load(path: &Path) -> Result<PriceBook, PricingError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PricingError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(&text, &origin)
    }

    /// Parses and validates a book's text; `origin` names it in errors.
    ///
    /// Prices, tier bounds and percents may be TOML strings (`"0.0420"`) or
    /// bare numbers (`0.0420`). A bare float is read from its literal text in
    /// the file, not from the `f64` TOML parsers produce, so `0.1` is exactly
    /// 0.1; `inf` and `nan` are refused.
    pub fn parse(text: &str, origin: &str) -> Result<PriceBook, PricingError> {
        let cx = Cx { text, origin };
        let raw: RawBook = toml::from_str(text).map_err(|e| {
            // toml's own errors (syntax, unknown keys, wrong types) carry a span.
            let line = e.span().map_or(1, |s| cx.line(s.start));
            cx.invalid_at(line, e.message().to_string())
        })?;

        let version = cx.required(
            raw.version,
            "version",
            "a name for this book, e.g. \"2026-11-01\"",
        )?;
        if version.get_ref().trim().is_empty() {
            return Err(cx.invalid(version.span(), "version is empty"));
        }
        let currency = cx.required(raw.currency, "currency", "an ISO 4217 code, e.g. \"USD\"")?;
        check_currency(&cx, &currency)?;

        let price = |v: Option<RawNumber>, key: &str| -> Result<Decimal, PricingError> {
            cx.price(
                &cx.required(v, key, "a price; write 0 to make it free")?,
                key,
            )
        };
        let cpu_per_core_hour = price(raw.cpu_per_core_hour, "cpu_per_core_hour")?;
        let memory_per_gb_hour = price(raw.memory_per_gb_hour, "memory_per_gb_hour")?;
        let gpu_per_hour = price(raw.gpu_per_hour, "gpu_per_hour")?;
        let storage_per_gb_month = price(raw.storage_per_gb_month, "storage_per_gb_month")?;
        let network = network_price(&cx, raw.network)?;

        let models = models::models(&cx, raw.models.unwrap_or_default())?;

        let tiers = tiers(&cx, raw.discounts.unwrap_or_default())?;

        Ok(PriceBook {
            version: version.into_inner(),
            currency: currency.into_inner(),
            cpu_per_core_hour,
            memory_per_gb_hour,
            gpu_per_hour,
            storage_per_gb_month,
            network,
            models,
            tiers,
        })
    }

    /// The book's version, stamped on every cost it produces.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The book's ISO 4217 currency.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// Prices a window's records in order. `month_to_date(party)` is the
    /// party's spend before the window (the ledger's), asked once per party;
    /// spend priced earlier in the window adds to it, so a tier boundary
    /// crossed mid-window applies to the party's later records.
    pub fn price_window<E>(
        &self,
        records: &mut [UsageRecord],
        mut month_to_date: impl FnMut(&str) -> Result<Decimal, E>,
    ) -> Result<(), E> {
        let mut spend: HashMap<String, Decimal> = HashMap::new();
        for r in records.iter_mut() {
            for t in &mut r.tokens {
                t.unpriced = (t.input > 0 || t.output > 0) && !self.has_model(&t.model);
            }
            let party = r.billed_party().map(str::to_string);
            let mtd = match &party {
                Some(p) => match spend.get(p) {
                    Some(d) => *d,
                    None => month_to_date(p)?,
                },
                None => Decimal::ZERO,
            };
            let (cost, parts) = self.price_parts(r, mtd);
            // Each usage keeps its own share of `cost.token`, so a run view
            // or a `model` group-by can split the token cost exactly.
            for (t, part) in r.tokens.iter_mut().zip(parts) {
                t.cost = Some(part.normalize());
            }
            if let Some(p) = party {
                spend.insert(p, mtd + cost.total);
            }
            r.cost = Some(cost);
        }
        Ok(())
    }

    /// Prices one record's raw quantities. `month_to_date` is the billed party's spend so far this month (before this record), which selects the discount tier.
    ///
    /// The whole record is priced at the tier its `month_to_date` falls in,
    /// even if the record itself carries spend across the next tier's `from`:
    /// a record is one window of one workload, tiny next to a tier's width, and
    /// splitting it would make a record's price depend on its order among the
    /// party's others. A record with no billed party ([`UsageRecord::billed_party`]) gets no
    /// discount. A negative month-to-date (credits) counts as 0.
    pub fn price(&self, r: &UsageRecord, month_to_date: Decimal) -> Cost {
        self.price_parts(r, month_to_date).0
    }

    /// [`price`](Self::price), with each token usage's cost (in `r.tokens`'
    /// order; `cost.token` is their sum).
    fn price_parts(&self, r: &UsageRecord, month_to_date: Decimal) -> (Cost, Vec<Decimal>) {
        let id = r.record_id.as_str();
        let cpu = product(
            &[r.cpu_core_seconds, self.cpu_per_core_hour],
            SECONDS_PER_HOUR,
            id,
        );
        let memory = product(
            &[r.memory_gb_seconds, self.memory_per_gb_hour],
            SECONDS_PER_HOUR,
            id,
        );
        let gpu = product(&[r.gpu_seconds, self.gpu_per_hour], SECONDS_PER_HOUR, id);
        let rx = Decimal::from(r.network_rx_bytes);
        let tx = Decimal::from(r.network_tx_bytes);
        let network = match self.network {
            NetworkPrice::PerGb(p) => product(&[rx + tx, p], BYTES_PER_GB, id),
            NetworkPrice::Split {
                rx_per_gb,
                tx_per_gb,
            } => sum(&[
                product(&[rx, rx_per_gb], BYTES_PER_GB, id),
                product(&[tx, tx_per_gb], BYTES_PER_GB, id),
            ]),
        };
        let storage = self.storage(r);
        let parts: Vec<Decimal> = r.tokens.iter().map(|t| self.tokens(t, id)).collect();
        let token = sum(&parts);
        let subtotal = sum(&[cpu, memory, gpu, network, storage, token]);
        let percent = match r.billed_party() {
            Some(_) => self.discount_percent(month_to_date),
            None => Decimal::ZERO,
        };
        let discount = product(&[subtotal, percent], Decimal::ONE_HUNDRED, id);
        let total = subtotal - discount;
        let cost = Cost {
            cpu: cpu.normalize(),
            memory: memory.normalize(),
            gpu: gpu.normalize(),
            network: network.normalize(),
            storage: storage.normalize(),
            token: token.normalize(),
            subtotal: subtotal.normalize(),
            discount: discount.normalize(),
            total: total.normalize(),
            currency: self.currency.clone(),
            pricing_version: self.version.clone(),
        };
        (cost, parts)
    }

    /// Storage held over the record's window; 0 where there is nothing held
    /// or the window's bounds do not parse.
    fn storage(&self, r: &UsageRecord) -> Decimal {
        let Some(bytes) = r.storage_bytes.filter(|&b| b > 0) else {
            return Decimal::ZERO;
        };
        let Some(seconds) = window_seconds(r) else {
            tracing::warn!(
                record_id = %r.record_id,
                window_start = %r.window_start,
                window_end = %r.window_end,
                "storage not priced: the window's bounds are not RFC 3339 or end before they start"
            );
            return Decimal::ZERO;
        };
        product(
            &[Decimal::from(bytes), self.storage_per_gb_month, seconds],
            BYTES_PER_GB * SECONDS_PER_MONTH,
            &r.record_id,
        )
    }

    /// One call's tokens (see [`models`] for the lookup and the split).
    ///
    /// A model the book does not price is priced at 0, not refused: the usage
    /// must never be dropped (the record keeps its token counts, marked
    /// `unpriced`), and re-pricing the record with a book that lists the
    /// model fixes the money. Each such usage is counted
    /// ([`unpriced_model_usages`]) and warned about at the 1st, 2nd, 4th,
    /// 8th… occurrence, so a flood costs a log line per doubling, not one
    /// per record.
    fn tokens(&self, t: &TokenUsage, record_id: &str) -> Decimal {
        let Some((_, entry)) = self.models.resolve(&t.model) else {
            if t.input > 0 || t.output > 0 {
                let n = UNPRICED_MODEL_USAGES.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        model = %t.model,
                        pricing_version = %self.version,
                        occurrences = n,
                        "model not in the price book: its tokens are priced at 0 \
                         (kept in the record; re-price after adding the model)"
                    );
                }
            }
            return Decimal::ZERO;
        };
        models::usage_cost(entry, t, record_id)
    }

    /// Whether the book prices `model` (by name, alias or dated name).
    pub fn has_model(&self, model: &str) -> bool {
        self.models.resolve(model).is_some()
    }

    /// The book's own name for the entry that prices `model`, if any: `gpt-4o-mini` for `gpt-4o-mini-2024-07-18`.
    pub fn resolve_model(&self, model: &str) -> Option<&str> {
        self.models.resolve(model).map(|(k, _)| k)
    }

    /// The book's models.
    pub fn models(&self) -> &Models {
        &self.models
    }

    /// The percent of the tier holding `month_to_date`.
    fn discount_percent(&self, month_to_date: Decimal) -> Decimal {
        let spend = month_to_date.max(Decimal::ZERO);
        self.tiers
            .iter()
            .find(|t| t.from <= spend && t.to.is_none_or(|to| spend < to))
            .map_or(Decimal::ZERO, |t| t.percent)
    }
}

/// Token usages priced at 0 because their model was not in the book, since start.
pub fn unpriced_model_usages() -> u64 {
    UNPRICED_MODEL_USAGES.load(Ordering::Relaxed)
}

static UNPRICED_MODEL_USAGES: AtomicU64 = AtomicU64::new(0);

/// Keeps a book in force and swaps in a new one only if it validates (reload); logs why a bad one was refused.
///
/// Holds an `Arc<PriceBook>` under the lock, so [`current`](Self::current)
/// hands out a snapshot without copying the model table, and a reload never
/// changes prices under a caller mid-record. Clones share the same book.
#[derive(Clone, Debug)]
pub struct PriceBookHandle {
    book: Arc<RwLock<Arc<PriceBook>>>,
}

impl PriceBookHandle {
    /// Puts `book` in force.
    pub fn new(book: PriceBook) -> Self {
        Self {
            book: Arc::new(RwLock::new(Arc::new(book))),
        }
    }

    /// The book in force now.
    pub fn current(&self) -> Arc<PriceBook> {
        // A poisoned lock can only follow a panic while swapping one Arc for
        // another, which leaves a whole book either way.
        Arc::clone(&self.book.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Loads the book at `path` and puts it in force if it validates; on error the old book stays and a warning says why.
    ///
    /// A book whose prices differ from the one in force but whose version is
    /// the same is refused too: costs would then name a version that no
    /// longer says which prices made them.
    pub fn reload(&self, path: &Path) -> Result<(), PricingError> {
        let old = self.current();
        let new = PriceBook::load(path).and_then(|new| {
            if new.version == old.version && new != *old {
                Err(PricingError::VersionReused {
                    origin: path.display().to_string(),
                    version: new.version,
                })
            } else {
                Ok(new)
            }
        });
        match new {
            Ok(new) => {
                tracing::info!(
                    path = %path.display(),
                    old_version = %old.version,
                    version = %new.version,
                    "price book in force"
                );
                *self.book.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    version_in_force = %old.version,
                    error = %e,
                    "price book refused; the old one stays in force"
                );
                Err(e)
            }
        }
    }
}

/// `d` rounded half-even to `currency`'s minor unit, with exactly that many decimals (the amount only, no code).
pub fn present(d: Decimal, currency: &str) -> String {
    let dp = minor_units(currency);
    let mut r = d.round_dp_with_strategy(dp, RoundingStrategy::MidpointNearestEven);
    if r.is_zero() {
        // -0.001 shows as 0.00, not -0.00.
        r = Decimal::ZERO;
    }
    // Rounding left at most `dp` decimals; rescaling only pads with zeros.
    r.rescale(dp);
    r.to_string()
}

/// Decimal places of `currency`'s minor unit (ISO 4217); 2 for codes not listed as otherwise.
pub fn minor_units(currency: &str) -> u32 {
    if ZERO_DECIMAL.contains(&currency) {
        0
    } else if THREE_DECIMAL.contains(&currency) {
        3
    } else if FOUR_DECIMAL.contains(&currency) {
        4
    } else {
        2
    }
}

/// ISO 4217 currencies with no minor unit.
const ZERO_DECIMAL: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
];
/// ISO 4217 currencies with three decimals.
const THREE_DECIMAL: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
/// ISO 4217 units of account with four decimals.
const FOUR_DECIMAL: &[&str] = &["CLF", "UYW"];

/// Active ISO 4217 codes a price can be in, sorted (for binary search).
///
/// National currencies and the national fund codes (BOV, CHE, CLF, ...);
/// not precious metals, SDRs, bond-market units or the test codes
/// (XAU, XDR, XBA, XTS, XXX, ...), in which nobody is invoiced. Withdrawn
/// codes (HRK, SLL, ZWL, ANG, CUC) are refused.
pub const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE", "CZK",
    "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS",
    "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD",
    "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD",
    "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT",
    "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK",
    "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD",
    "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP",
    "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS",
    "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV", "WST",
    "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// The window's length in seconds, exact to the nanosecond; `None` if a bound
/// does not parse or the window runs backwards.
fn window_seconds(r: &UsageRecord) -> Option<Decimal> {
    let start = OffsetDateTime::parse(&r.window_start, &Rfc3339).ok()?;
    let end = OffsetDateTime::parse(&r.window_end, &Rfc3339).ok()?;
    let ns = (end - start).whole_nanoseconds();
    (ns >= 0).then(|| Decimal::from_i128_with_scale(ns, 9))
}

/// Π `factors` / `divisor`, multiplying first so only the last step can round.
///
/// Overflow needs an amount above 7.9 × 10²⁸, which no physical quantity at any
/// price reaches; should corrupt input get there, the component is priced at
/// 0 and an error logged rather than the agent panicking (the raw quantities
/// stay in the record).
fn product(factors: &[Decimal], divisor: Decimal, record_id: &str) -> Decimal {
    factors
        .iter()
        .try_fold(Decimal::ONE, |acc, f| acc.checked_mul(*f))
        .and_then(|p| p.checked_div(divisor))
        .unwrap_or_else(|| {
            if count_overflow() {
                tracing::error!(record_id, "cost overflows Decimal; component priced at 0");
            }
            Decimal::ZERO
        })
}

/// Σ `parts`, saturating (see [`product`] on why overflow cannot happen in
/// practice); a saturated sum is counted in [`cost_overflows`].
fn sum(parts: &[Decimal]) -> Decimal {
    parts
        .iter()
        .try_fold(Decimal::ZERO, |acc, p| acc.checked_add(*p))
        .unwrap_or_else(|| {
            if count_overflow() {
                tracing::error!("a cost sum overflows Decimal; saturated at its maximum");
            }
            Decimal::MAX
        })
}

/// Counts one overflow; true at the 1st, 2nd, 4th, 8th… so a flood of them
/// logs a line per doubling, not one per record.
fn count_overflow() -> bool {
    (COST_OVERFLOWS.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
}

/// Cost components that overflowed `Decimal` (priced at 0, or a sum saturated), since start.
pub fn cost_overflows() -> u64 {
    COST_OVERFLOWS.load(Ordering::Relaxed)
}

static COST_OVERFLOWS: AtomicU64 = AtomicU64::new(0);

/// A price, bound or percent as written: a string, an integer or a float,
/// with its place in the text.
type RawNumber = Spanned<toml::Value>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBook {
    version: Option<Spanned<String>>,
    currency: Option<Spanned<String>>,
    cpu_per_core_hour: Option<RawNumber>,
    memory_per_gb_hour: Option<RawNumber>,
    gpu_per_hour: Option<RawNumber>,
    storage_per_gb_month: Option<RawNumber>,
    network: Option<Spanned<RawNetwork>>,
    models: Option<BTreeMap<String, Spanned<models::RawModel>>>,
    discounts: Option<Vec<Spanned<RawTier>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    per_gb: Option<RawNumber>,
    rx_per_gb: Option<RawNumber>,
    tx_per_gb: Option<RawNumber>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    from: RawNumber,
    to: Option<RawNumber>,
    percent: RawNumber,
}

/// The book's text and name, for reading literals and placing errors.
struct Cx<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Cx<'_> {
    /// The 1-based line holding byte `offset`.
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn invalid_at(&self, line: usize, reason: impl Into<String>) -> PricingError {
        PricingError::Invalid {
            origin: self.origin.to_string(),
            line,
            reason: reason.into(),
        }
    }

    fn invalid(&self, span: Range<usize>, reason: impl Into<String>) -> PricingError {
        self.invalid_at(self.line(span.start), reason)
    }

    /// A required top-level key; missing ones are reported at line 1, where
    /// top-level keys belong.
    fn required<T>(&self, v: Option<T>, key: &str, what: &str) -> Result<T, PricingError> {
        v.ok_or_else(|| self.invalid_at(1, format!("missing {key} ({what})")))
    }

    /// A decimal number as written, never through `f64`.
    fn number(&self, v: &RawNumber, key: &str) -> Result<Decimal, PricingError> {
        let parsed = match v.get_ref() {
            toml::Value::String(s) => decimal_from_text(s),
            toml::Value::Integer(i) => Some(Decimal::from(*i)),
            // The float's literal text, e.g. `0.1` or `1_000.5` or `2.5e-3`.
            toml::Value::Float(_) => self
                .text
                .get(v.span())
                .and_then(|lit| decimal_from_text(&lit.replace('_', ""))),
            other => {
                return Err(self.invalid(
                    v.span(),
                    format!(
                        "{key} must be a number or a decimal string (e.g. \"0.0420\"), not a {}",
                        other.type_str()
                    ),
                ));
            }
        };
        let literal = self.text.get(v.span()).unwrap_or_default();
        match parsed {
            // -0 and 0.000 are both plain 0.
            Some(d) if d.is_zero() => Ok(Decimal::ZERO),
            Some(d) => Ok(d),
            None => Err(self.invalid(
                v.span(),
                format!(
                    "{key} is not a finite decimal number ({literal}); \
                     write a decimal like \"0.0420\" or 0.0420"
                ),
            )),
        }
    }

    /// A non-negative price.
    fn price(&self, v: &RawNumber, key: &str) -> Result<Decimal, PricingError> {
        let d = self.number(v, key)?;
        if d.is_sign_negative() {
            return Err(self.invalid(v.span(), format!("{key} is negative ({d})")));
        }
        Ok(d)
    }
}

/// Parses `0.0420`, `-1`, `+2`, `2.5e-3`: exactly, refusing what would need
/// more than `Decimal`'s 28 digits rather than rounding it.
fn decimal_from_text(s: &str) -> Option<Decimal> {
    let s = s.strip_prefix('+').unwrap_or(s);
    match s.split_once(['e', 'E']) {
        // Checking the mantissa exactly first: from_scientific would round it.
        Some((mantissa, _)) => {
            Decimal::from_str_exact(mantissa).ok()?;
            Decimal::from_scientific(s).ok()
        }
        None => Decimal::from_str_exact(s).ok(),
    }
}

fn check_currency(cx: &Cx<'_>, currency: &Spanned<String>) -> Result<(), PricingError> {
    let code = currency.get_ref();
    if ISO_4217.binary_search(&code.as_str()).is_ok() {
        return Ok(());
    }
    let upper = code.to_ascii_uppercase();
    let hint = if ISO_4217.binary_search(&upper.as_str()).is_ok() {
        format!(" (codes are upper case: {upper:?})")
    } else {
        String::new()
    };
    Err(cx.invalid(
        currency.span(),
        format!("currency {code:?} is not an active ISO 4217 code{hint}"),
    ))
}

fn network_price(
    cx: &Cx<'_>,
    network: Option<Spanned<RawNetwork>>,
) -> Result<NetworkPrice, PricingError> {
    let Some(network) = network else {
        return Err(cx.invalid_at(
            1,
            "missing [network] (per_gb, or rx_per_gb and tx_per_gb; write 0 to make it free)",
        ));
    };
    let span = network.span();
    let n = network.into_inner();
    match (n.per_gb, n.rx_per_gb, n.tx_per_gb) {
        (Some(p), None, None) => Ok(NetworkPrice::PerGb(cx.price(&p, "network.per_gb")?)),
        (None, Some(rx), Some(tx)) => Ok(NetworkPrice::Split {
            rx_per_gb: cx.price(&rx, "network.rx_per_gb")?,
            tx_per_gb: cx.price(&tx, "network.tx_per_gb")?,
        }),
        (Some(_), Some(split), _) | (Some(_), None, Some(split)) => Err(cx.invalid(
            split.span(),
            "network has both per_gb and a per-direction price; give per_gb alone, \
             or rx_per_gb and tx_per_gb",
        )),
        (None, Some(_), None) => Err(cx.invalid(span, "network.rx_per_gb without tx_per_gb")),
        (None, None, Some(_)) => Err(cx.invalid(span, "network.tx_per_gb without rx_per_gb")),
        (None, None, None) => Err(cx.invalid(
            span,
            "network has no price (per_gb, or rx_per_gb and tx_per_gb)",
        )),
    }
}

/// Validates the discount tiers: from 0, ascending, contiguous, percent in
/// 0..=100, and only the last (which must) open-ended, so every month-to-date
/// spend falls in exactly one tier.
fn tiers(cx: &Cx<'_>, raw: Vec<Spanned<RawTier>>) -> Result<Vec<Tier>, PricingError> {
    let count = raw.len();
    let mut tiers: Vec<Tier> = Vec::with_capacity(count);
    for (i, spanned) in raw.into_iter().enumerate() {
        let header = spanned.span();
        let t = spanned.into_inner();
        let name = format!("[[discounts]] #{}", i + 1);
        let from = cx.number(&t.from, &format!("{name} from"))?;
        let to = match &t.to {
            Some(v) => Some(cx.number(v, &format!("{name} to"))?),
            None => None,
        };
        let percent = cx.number(&t.percent, &format!("{name} percent"))?;

        match tiers.last() {
            None if !from.is_zero() => {
                return Err(cx.invalid(
                    t.from.span(),
                    format!("{name} from is {from}; the first tier must start at 0"),
                ));
            }
            None => {}
            Some(prev) => {
                // Every tier but the last has a `to` (checked below as we pass it).
                let prev_to = prev.to.unwrap_or(prev.from);
                if from < prev.from {
                    return Err(cx.invalid(
                        t.from.span(),
                        format!(
                            "{name} from ({from}) is below the previous tier's from ({}); \
                             list tiers in ascending order",
                            prev.from
                        ),
                    ));
                }
                if from < prev_to {
                    return Err(cx.invalid(
                        t.from.span(),
                        format!("{name} from ({from}) overlaps the previous tier, which runs to {prev_to}"),
                    ));
                }
                if from > prev_to {
                    return Err(cx.invalid(
                        t.from.span(),
                        format!(
                            "{name} from ({from}) leaves a gap after the previous tier, \
                             which ends at {prev_to}; tiers must be contiguous"
                        ),
                    ));
                }
            }
        }
        match (&t.to, to) {
            (Some(v), Some(to)) if to <= from => {
                return Err(cx.invalid(
                    v.span(),
                    format!("{name} to ({to}) must be greater than its from ({from})"),
                ));
            }
            (Some(v), Some(_)) if i + 1 == count => {
                return Err(cx.invalid(
                    v.span(),
                    format!(
                        "{name} is the last tier and must omit `to`, so every spend falls in a tier"
                    ),
                ));
            }
            (None, _) if i + 1 < count => {
                return Err(
                    cx.invalid(header, format!("{name} omits `to`; only the last tier may"))
                );
            }
            _ => {}
        }
        if percent.is_sign_negative() || percent > Decimal::ONE_HUNDRED {
            return Err(cx.invalid(
                t.percent.span(),
                format!("{name} percent is {percent}, outside 0..=100"),
            ));
        }
        tiers.push(Tier { from, to, percent });
    }
    Ok(tiers)
}

/// Books for the submodules' tests: the resources of a minimal book plus the given models.
#[cfg(test)]
mod tests_support {
    use super::PriceBook;

    /// A valid book's top (resources, network) followed by `models`.
    pub fn with_resources(models: &str) -> String {
        format!(
            "version = \"t\"\ncurrency = \"USD\"\ncpu_per_core_hour = 0\nmemory_per_gb_hour = 0\n\
             gpu_per_hour = 0\nstorage_per_gb_month = 0\n[network]\nper_gb = 0\n{models}"
        )
    }

    /// That book parsed; the error's message where it is refused.
    pub fn book_with(models: &str) -> Result<PriceBook, String> {
        PriceBook::parse(&with_resources(models), "pricing.toml").map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).expect("a decimal literal")
    }

    /// The book most tests price with. Line numbers matter to the malformed-book
    /// tests: `cpu_per_core_hour` is on line 7.
    const BOOK: &str = r#"# test book
# line 2
# line 3
version = "2026-11-01"
currency = "USD"
# prices: strings and bare numbers both
cpu_per_core_hour = "0.0420"
memory_per_gb_hour = 0.0050
gpu_per_hour = "2.50"
storage_per_gb_month = 0.1
[network]
rx_per_gb = "0.01"
tx_per_gb = 0.05
[models."gpt-4o"]
input_per_1k = "0.0025"
output_per_1k = "0.0100"
cache_read_input_per_1k = "0.00125"
[models."claude-x"]
input_per_1k = 0.003
output_per_1k = 0.015
[[discounts]]
from = "0"
to = "1000"
percent = "0"
[[discounts]]
from = "1000"
to = 5000
percent = "12.5"
[[discounts]]
from = 5000
percent = 20
"#;

    /// The same raw quantities priced a month later: new prices, one network price.
    const BOOK_V2: &str = r#"version = "2026-12-01"
currency = "USD"
cpu_per_core_hour = "0.05"
memory_per_gb_hour = "0.006"
gpu_per_hour = "3.00"
storage_per_gb_month = "0.12"
[network]
per_gb = "0.02"
[models."gpt-4o"]
input_per_1k = "0.005"
output_per_1k = "0.02"
"#;

    fn book() -> PriceBook {
        PriceBook::parse(BOOK, "pricing.toml").expect("the test book is valid")
    }

    /// A one-second window with no usage and nobody to bill.
    fn record() -> UsageRecord {
        UsageRecord {
            record_id: "r1".into(),
            node: "n1".into(),
            window_start: "2026-11-03T10:00:00Z".into(),
            window_end: "2026-11-03T10:00:01Z".into(),
            record_kind: "process".into(),
            ..UsageRecord::default()
        }
    }

    /// The message a malformed book is refused with.
    fn refused(text: &str) -> String {
        match PriceBook::parse(text, "pricing.toml") {
            Ok(b) => panic!("accepted a malformed book: {b:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// BOOK with the line holding `old` replaced by `new` (same line count unless `new` adds lines).
    fn with(old: &str, new: &str) -> String {
        assert!(BOOK.contains(old), "{old:?} not in BOOK");
        BOOK.replacen(old, new, 1)
    }

    fn assert_sums(c: &Cost) {
        assert_eq!(
            c.subtotal,
            c.cpu + c.memory + c.gpu + c.network + c.storage + c.token
        );
        assert_eq!(c.total, c.subtotal - c.discount);
    }

    #[test]
    fn cpu_and_memory_only() {
        let r = UsageRecord {
            cpu_core_seconds: dec("1.5"),
            memory_gb_seconds: dec("7200"),
            ..record()
        };
        let c = book().price(&r, Decimal::ZERO);
        // cpu    = 1.5 × 0.0420 / 3600 = 0.063 / 3600 = 0.0000175
        assert_eq!(c.cpu, dec("0.0000175"));
        // memory = 7200 × 0.0050 / 3600 = 36 / 3600 = 0.01
        assert_eq!(c.memory, dec("0.01"));
        assert_eq!(c.gpu, Decimal::ZERO);
        assert_eq!(c.network, Decimal::ZERO);
        assert_eq!(c.storage, Decimal::ZERO);
        assert_eq!(c.token, Decimal::ZERO);
        // subtotal = 0.0000175 + 0.01 = 0.0100175; nobody billed → no discount
        assert_eq!(c.subtotal, dec("0.0100175"));
        assert_eq!(c.discount, Decimal::ZERO);
        assert_eq!(c.total, dec("0.0100175"));
        assert_eq!(c.currency, "USD");
        assert_eq!(c.pricing_version, "2026-11-01");
        assert_sums(&c);
    }

    #[test]
    fn gpu_seconds() {
        let r = UsageRecord {
            gpu_seconds: dec("90"),
            ..record()
        };
        // 90 × 2.50 / 3600 = 225 / 3600 = 0.0625
        assert_eq!(book().price(&r, Decimal::ZERO).gpu, dec("0.0625"));
    }

    #[test]
    fn network_split_by_direction() {
        let r = UsageRecord {
            network_rx_bytes: 2 * (1 << 30),
            network_tx_bytes: 1 << 29,
            ..record()
        };
        let c = book().price(&r, Decimal::ZERO);
        // rx = 2147483648 × 0.01 / 1073741824 = 2 × 0.01 = 0.02
        // tx =  536870912 × 0.05 / 1073741824 = 0.5 × 0.05 = 0.025
        // network = 0.02 + 0.025 = 0.045
        assert_eq!(c.network, dec("0.045"));
        assert_eq!(c.total, dec("0.045"));
        assert_sums(&c);

        // One price for both directions: (2147483648 + 536870912) × 0.01 / 1073741824
        // = 2.5 × 0.01 = 0.025
        let flat = PriceBook::parse(
            &with(
                "rx_per_gb = \"0.01\"\ntx_per_gb = 0.05",
                "per_gb = \"0.01\"",
            ),
            "p",
        )
        .expect("valid");
        assert_eq!(flat.price(&r, Decimal::ZERO).network, dec("0.025"));
    }

    #[test]
    fn storage_over_a_60s_window() {
        let r = UsageRecord {
            window_start: "2026-11-03T10:00:00.5Z".into(),
            window_end: "2026-11-03T10:01:00.5Z".into(),
            storage_bytes: Some(432 * (1 << 30)),
            ..record()
        };
        let c = book().price(&r, Decimal::ZERO);
        // 463856467968 bytes (432 GiB) × 0.1 × 60 s / (1073741824 × 2592000)
        // = 2783138807808 / 2783138807808000 = 0.001
        // (0.1 read through f64 would give 0.001000000000000000055…)
        assert_eq!(c.storage, dec("0.001"));
        assert_eq!(c.total, dec("0.001"));

        // Nothing held, or unknown: 0.
        assert_eq!(
            book().price(&record(), Decimal::ZERO).storage,
            Decimal::ZERO
        );
        // A window that does not parse prices storage at 0 rather than guessing.
        let bad = UsageRecord {
            window_end: "yesterday".into(),
            ..r
        };
        assert_eq!(book().price(&bad, Decimal::ZERO).storage, Decimal::ZERO);
    }

    #[test]
    fn tokens_for_two_models_without_double_counting() {
        let before = unpriced_model_usages();
        let r = UsageRecord {
            tokens: vec![
                TokenUsage {
                    model: "gpt-4o".into(),
                    input: 10_000,
                    cache_read_input: 4_000,
                    output: 2_000,
                    reasoning_output: 500,
                    ..TokenUsage::default()
                },
                TokenUsage {
                    model: "claude-x".into(),
                    input: 1_000,
                    cache_read_input: 200,
                    output: 300,
                    reasoning_output: 300,
                    ..TokenUsage::default()
                },
                TokenUsage {
                    model: "not-in-the-book".into(),
                    input: 5_000,
                    output: 5_000,
                    ..TokenUsage::default()
                },
            ],
            ..record()
        };
        let c = book().price(&r, Decimal::ZERO);
        // gpt-4o:   (10000 − 4000) × 0.0025 / 1000 = 0.015
        //                    4000 × 0.00125 / 1000 = 0.005
        //                    2000 × 0.0100 / 1000 = 0.02    (500 reasoning are inside the 2000)
        //           = 0.04   (counting cached input twice would give 0.05 or 0.065;
        //                     adding reasoning again would give 0.045)
        // claude-x: (1000 − 200) × 0.003 / 1000 = 0.0024
        //                    200 × 0.003 / 1000 = 0.0006  (cache price defaults to input)
        //                    300 × 0.015 / 1000 = 0.0045  (all 300 reasoning: still 300)
        //           = 0.0075
        // unknown model: 0
        // token = 0.04 + 0.0075 = 0.0475
        assert_eq!(c.token, dec("0.0475"));
        assert_eq!(c.total, dec("0.0475"));
        assert_sums(&c);
        assert!(unpriced_model_usages() > before);
    }

    #[test]
    fn a_window_marks_the_tokens_it_could_not_price() {
        let mut records = vec![UsageRecord {
            tokens: vec![
                TokenUsage {
                    model: "gpt-4o-2024-08-06".into(),
                    input: 1_000,
                    ..TokenUsage::default()
                },
                TokenUsage {
                    model: "not-in-the-book".into(),
                    output: 10,
                    ..TokenUsage::default()
                },
                TokenUsage {
                    model: "not-in-the-book-either".into(),
                    ..TokenUsage::default()
                },
            ],
            ..record()
        }];
        book()
            .price_window(&mut records, |_| Ok::<_, ()>(Decimal::ZERO))
            .expect("priced");
        let marks: Vec<bool> = records[0].tokens.iter().map(|t| t.unpriced).collect();
        // Dated gpt-4o is priced (1000 × 0.0025 / 1000); the unknown model's
        // tokens are marked; a usage of no tokens is nothing to price.
        assert_eq!(marks, [false, true, false]);
        assert_eq!(
            records[0].cost.as_ref().map(|c| c.token),
            Some(dec("0.0025"))
        );
        let json = serde_json::to_string(&records[0].tokens).expect("serialises");
        assert_eq!(json.matches("\"unpriced\":true").count(), 1, "{json}");
        // A record stored before these fields existed reads back as before.
        let old: Vec<TokenUsage> = serde_json::from_str(
            r#"[{"model":"m","input":5,"cache_read_input":1,"output":2,"reasoning_output":0}]"#,
        )
        .expect("old JSON reads");
        assert_eq!(
            (old[0].input, old[0].cache_creation_input, old[0].unpriced),
            (5, 0, false)
        );
    }

    #[test]
    fn overflowing_costs_are_counted_not_panicked_on() {
        // A price no book should hold times the largest count a client can claim:
        // 1.8e19 tokens × 1e20 per 1k exceeds Decimal's 7.9e28.
        let text = with(r#"input_per_1k = "0.0025""#, r#"input_per_1k = "1e20""#);
        let b = PriceBook::parse(&text, "t").expect("valid");
        let before = cost_overflows();
        let r = UsageRecord {
            tokens: vec![TokenUsage {
                model: "gpt-4o".into(),
                input: u64::MAX,
                ..TokenUsage::default()
            }],
            cpu_core_seconds: dec("1"),
            ..record()
        };
        let c = b.price(&r, Decimal::ZERO);
        // The token component is priced at 0; the rest of the record still is.
        assert_eq!(c.token, Decimal::ZERO);
        assert!(c.cpu > Decimal::ZERO);
        // Other tests run in parallel and may overflow too: at least one more.
        assert!(cost_overflows() > before);
        assert!(b.has_model("gpt-4o") && !b.has_model("not-in-the-book"));
    }

    #[test]
    fn cached_input_above_input_is_clamped() {
        let r = UsageRecord {
            tokens: vec![TokenUsage {
                model: "gpt-4o".into(),
                input: 1_000,
                cache_read_input: 3_000,
                ..TokenUsage::default()
            }],
            ..record()
        };
        // cached = min(3000, 1000) = 1000; 1000 × 0.00125 / 1000 = 0.00125
        assert_eq!(book().price(&r, Decimal::ZERO).token, dec("0.00125"));
    }

    #[test]
    fn a_window_asks_month_to_date_once_per_party_and_accrues_its_own_spend() {
        // Each record: 14400 GPU-seconds = 10 before discount (see below).
        let rec = |id: &str, customer: Option<&str>, user: Option<&str>| UsageRecord {
            record_id: id.into(),
            context: crate::identity::run::RunContext {
                customer_id: customer.map(String::from),
                user_id: user.map(String::from),
                ..Default::default()
            },
            gpu_seconds: dec("14400"),
            ..record()
        };
        let mut records = vec![
            rec("a1", Some("acme"), None),
            rec("a2", Some("acme"), None),
            // An empty customer id names nobody: the user is billed.
            rec("u1", Some(""), Some("alice")),
            rec("n1", None, None),
        ];
        let mut asked = Vec::new();
        book()
            .price_window(&mut records, |p| {
                asked.push(p.to_string());
                // acme is 5 short of the 2nd tier (1000); alice far from it.
                Ok::<_, ()>(if p == "acme" { dec("995") } else { dec("0") })
            })
            .expect("priced");
        assert_eq!(asked, ["acme", "alice"]);
        let total = |i: usize| records[i].cost.as_ref().map(|c| c.total);
        // a1 at 995: no discount; a2 at 1005 (995 + a1's 10): 12.5 % off.
        assert_eq!(total(0), Some(dec("10")));
        assert_eq!(total(1), Some(dec("8.75")));
        assert_eq!(total(2), Some(dec("10")));
        assert_eq!(total(3), Some(dec("10")));
        // A failing lookup fails the window, naming nothing priced half-way.
        let mut again = vec![rec("a3", Some("acme"), None)];
        assert_eq!(
            book().price_window(&mut again, |_| Err("ledger down")),
            Err("ledger down")
        );
    }

    #[test]
    fn discount_tier_boundary() {
        let r = UsageRecord {
            context: crate::identity::run::RunContext {
                customer_id: Some("acme".into()),
                ..Default::default()
            },
            gpu_seconds: dec("14400"),
            ..record()
        };
        // subtotal = 14400 × 2.50 / 3600 = 10
        let b = book();
        let at = |mtd: &str| b.price(&r, dec(mtd));

        // 999.99 is in [0, 1000): 0 %
        let c = at("999.99");
        assert_eq!(
            (c.subtotal, c.discount, c.total),
            (dec("10"), dec("0"), dec("10"))
        );
        // 1000 is the 2nd tier's `from` (inclusive): 10 × 12.5 / 100 = 1.25 off, 8.75
        let c = at("1000");
        assert_eq!(
            (c.subtotal, c.discount, c.total),
            (dec("10"), dec("1.25"), dec("8.75"))
        );
        assert_sums(&c);
        // 4999.99 still in the 2nd tier; 5000 opens the 3rd: 10 × 20 / 100 = 2 off
        assert_eq!(at("4999.99").discount, dec("1.25"));
        assert_eq!(at("5000").total, dec("8"));
        assert_eq!(at("1000000").total, dec("8"));
        // Credits drive month-to-date below 0: the first tier.
        assert_eq!(at("-5").discount, Decimal::ZERO);

        // The user is billed when there is no customer.
        let user = UsageRecord {
            context: crate::identity::run::RunContext {
                customer_id: None,
                user_id: Some("u1".into()),
                ..Default::default()
            },
            ..r.clone()
        };
        assert_eq!(user.billed_party(), Some("u1"));
        assert_eq!(b.price(&user, dec("1000")).discount, dec("1.25"));
        // Nobody billed: no discount whatever month-to-date says.
        let nobody = UsageRecord {
            context: crate::identity::run::RunContext {
                customer_id: Some(String::new()),
                user_id: None,
                ..Default::default()
            },
            ..r.clone()
        };
        assert_eq!(nobody.billed_party(), None);
        assert_eq!(b.price(&nobody, dec("5000")).discount, Decimal::ZERO);
        assert_eq!(r.billed_party(), Some("acme"));
    }

    #[test]
    fn repricing_with_a_second_book_version() {
        let r = UsageRecord {
            context: crate::identity::run::RunContext {
                customer_id: Some("acme".into()),
                ..Default::default()
            },
            cpu_core_seconds: dec("3600"),
            memory_gb_seconds: dec("3600"),
            gpu_seconds: dec("3600"),
            network_rx_bytes: 1 << 30,
            network_tx_bytes: 1 << 30,
            tokens: vec![TokenUsage {
                model: "gpt-4o".into(),
                input: 1_000,
                output: 1_000,
                ..TokenUsage::default()
            }],
            ..record()
        };
        let kept = r.clone();
        let v1 = book().price(&r, Decimal::ZERO);
        // cpu 3600 × 0.0420 / 3600 = 0.042; memory 3600 × 0.0050 / 3600 = 0.005;
        // gpu 3600 × 2.50 / 3600 = 2.5; network 1 GiB × 0.01 + 1 GiB × 0.05 = 0.06;
        // token 1000 × 0.0025 / 1000 + 1000 × 0.0100 / 1000 = 0.0125
        // subtotal = 0.042 + 0.005 + 2.5 + 0.06 + 0.0125 = 2.6195; tier 1: 0 % off
        assert_eq!(v1.total, dec("2.6195"));
        assert_eq!(v1.pricing_version, "2026-11-01");

        let v2 = PriceBook::parse(BOOK_V2, "pricing-v2.toml")
            .expect("valid")
            .price(&r, Decimal::ZERO);
        // cpu 3600 × 0.05 / 3600 = 0.05; memory 3600 × 0.006 / 3600 = 0.006;
        // gpu 3600 × 3.00 / 3600 = 3; network (1 + 1) GiB × 0.02 = 0.04;
        // token 1000 × 0.005 / 1000 + 1000 × 0.02 / 1000 = 0.025
        // subtotal = 0.05 + 0.006 + 3 + 0.04 + 0.025 = 3.121; no tiers: 0 off
        assert_eq!(
            (v2.cpu, v2.memory, v2.gpu, v2.network, v2.token),
            (
                dec("0.05"),
                dec("0.006"),
                dec("3"),
                dec("0.04"),
                dec("0.025")
            )
        );
        assert_eq!(v2.total, dec("3.121"));
        assert_eq!(v2.pricing_version, "2026-12-01");
        assert_sums(&v2);
        // Pricing read the raw quantities and changed none of them.
        assert_eq!(r, kept);
    }

    #[test]
    fn cost_serialises_exact_strings() {
        let r = UsageRecord {
            cpu_core_seconds: dec("1.5"),
            ..record()
        };
        let json = serde_json::to_value(book().price(&r, Decimal::ZERO)).expect("serialises");
        assert_eq!(json["cpu"], "0.0000175");
        assert_eq!(json["pricing_version"], "2026-11-01");
    }

    #[test]
    fn numbers_are_read_from_their_text() {
        for (lit, want) in [
            ("0.1", "0.1"),
            ("\"0.1\"", "0.1"),
            ("1_000.000_5", "1000.0005"),
            ("2.5e-3", "0.0025"),
            ("+3", "3"),
            ("0x10", "16"),
            ("-0.0", "0"),
        ] {
            let b = PriceBook::parse(
                &with("gpu_per_hour = \"2.50\"", &format!("gpu_per_hour = {lit}")),
                "p",
            )
            .expect(lit);
            assert_eq!(b.gpu_per_hour, dec(want), "{lit}");
        }
    }

    #[test]
    fn the_shipped_book_is_valid() {
        let b = PriceBook::parse(DEFAULT_BOOK, "deploy/pricing.toml")
            .expect("deploy/pricing.toml validates");
        assert_eq!(b.currency(), "USD");
        assert!(!b.version().is_empty());
    }

    #[test]
    fn refuses_negative_prices_with_the_line() {
        assert_eq!(
            refused(&with(
                "cpu_per_core_hour = \"0.0420\"",
                "cpu_per_core_hour = -1"
            )),
            "pricing.toml:7: cpu_per_core_hour is negative (-1)"
        );
        assert_eq!(
            refused(&with("tx_per_gb = 0.05", "tx_per_gb = -0.05")),
            "pricing.toml:13: network.tx_per_gb is negative (-0.05)"
        );
        assert_eq!(
            refused(&with("output_per_1k = 0.015", "output_per_1k = \"-0.015\"")),
            "pricing.toml:20: models.\"claude-x\".output_per_1k is negative (-0.015)"
        );
    }

    #[test]
    fn refuses_non_numeric_prices_with_the_line() {
        let e = refused(&with(
            "memory_per_gb_hour = 0.0050",
            "memory_per_gb_hour = \"abc\"",
        ));
        assert!(
            e.starts_with(
                "pricing.toml:8: memory_per_gb_hour is not a finite decimal number (\"abc\")"
            ),
            "{e}"
        );
        let e = refused(&with(
            "memory_per_gb_hour = 0.0050",
            "memory_per_gb_hour = inf",
        ));
        assert!(
            e.starts_with(
                "pricing.toml:8: memory_per_gb_hour is not a finite decimal number (inf)"
            ),
            "{e}"
        );
        let e = refused(&with(
            "memory_per_gb_hour = 0.0050",
            "memory_per_gb_hour = true",
        ));
        assert!(
            e.starts_with("pricing.toml:8: memory_per_gb_hour must be a number"),
            "{e}"
        );
        // More digits than Decimal holds would be rounded: refused instead.
        let e = refused(&with(
            "memory_per_gb_hour = 0.0050",
            "memory_per_gb_hour = \"0.00000000000000000000000000001\"",
        ));
        assert!(
            e.starts_with("pricing.toml:8: memory_per_gb_hour is not a finite"),
            "{e}"
        );
    }

    #[test]
    fn refuses_unknown_keys_with_the_line() {
        let e = refused(&with("gpu_per_hour = \"2.50\"", "gpu_per_hr = \"2.50\""));
        assert!(
            e.starts_with("pricing.toml:9: unknown field `gpu_per_hr`"),
            "{e}"
        );
        let e = refused(&with("tx_per_gb = 0.05", "tx_per_gb = 0.05\negress = 1"));
        assert!(
            e.starts_with("pricing.toml:14: unknown field `egress`"),
            "{e}"
        );
        let e = refused(&with(
            "cache_read_input_per_1k = \"0.00125\"",
            "cached_per_1k = \"0.00125\"",
        ));
        assert!(
            e.starts_with("pricing.toml:17: unknown field `cached_per_1k`"),
            "{e}"
        );
        let e = refused(&with("percent = 20", "percent = 20\ncustomer = \"acme\""));
        assert!(
            e.starts_with("pricing.toml:32: unknown field `customer`"),
            "{e}"
        );
    }

    #[test]
    fn refuses_syntax_errors_with_the_line() {
        let e = refused(&with("gpu_per_hour = \"2.50\"", "gpu_per_hour = = 2"));
        assert!(e.starts_with("pricing.toml:9: "), "{e}");
        let e = refused(&with(
            "currency = \"USD\"",
            "currency = \"USD\"\nversion = \"again\"",
        ));
        assert!(e.starts_with("pricing.toml:6: duplicate key"), "{e}");
    }

    #[test]
    fn refuses_unknown_currencies() {
        assert_eq!(
            refused(&with("currency = \"USD\"", "currency = \"ABC\"")),
            "pricing.toml:5: currency \"ABC\" is not an active ISO 4217 code"
        );
        assert_eq!(
            refused(&with("currency = \"USD\"", "currency = \"usd\"")),
            "pricing.toml:5: currency \"usd\" is not an active ISO 4217 code (codes are upper case: \"USD\")"
        );
        // Withdrawn and non-currency codes.
        for code in ["HRK", "XAU", "XXX"] {
            refused(&with(
                "currency = \"USD\"",
                &format!("currency = \"{code}\""),
            ));
        }
        assert!(PriceBook::parse(&with("currency = \"USD\"", "currency = \"KWD\""), "p").is_ok());
    }

    #[test]
    fn refuses_missing_or_empty_version() {
        let e = refused(&with("version = \"2026-11-01\"", ""));
        assert!(e.starts_with("pricing.toml:1: missing version"), "{e}");
        assert_eq!(
            refused(&with("version = \"2026-11-01\"", "version = \" \"")),
            "pricing.toml:4: version is empty"
        );
        let e = refused(&with("version = \"2026-11-01\"", "version = 2026"));
        assert!(e.starts_with("pricing.toml:4: invalid type"), "{e}");
        let e = refused(&with("storage_per_gb_month = 0.1", ""));
        assert!(
            e.starts_with("pricing.toml:1: missing storage_per_gb_month"),
            "{e}"
        );
    }

    #[test]
    fn refuses_ambiguous_or_incomplete_network_prices() {
        let e = refused(&with(
            "rx_per_gb = \"0.01\"",
            "per_gb = \"0.01\"\nrx_per_gb = \"0.01\"",
        ));
        assert!(
            e.starts_with("pricing.toml:13: network has both per_gb and a per-direction price"),
            "{e}"
        );
        assert_eq!(
            refused(&with("tx_per_gb = 0.05", "")),
            "pricing.toml:11: network.rx_per_gb without tx_per_gb"
        );
        let e = refused(&with(
            "[network]\nrx_per_gb = \"0.01\"\ntx_per_gb = 0.05\n",
            "",
        ));
        assert!(e.starts_with("pricing.toml:1: missing [network]"), "{e}");
    }

    #[test]
    fn refuses_percent_outside_0_to_100() {
        assert_eq!(
            refused(&with("percent = 20", "percent = 150")),
            "pricing.toml:31: [[discounts]] #3 percent is 150, outside 0..=100"
        );
        assert_eq!(
            refused(&with("percent = \"12.5\"", "percent = \"-1\"")),
            "pricing.toml:28: [[discounts]] #2 percent is -1, outside 0..=100"
        );
    }

    #[test]
    fn refuses_overlapping_tiers() {
        let e = refused(&with("from = 5000", "from = 4000"));
        assert!(
            e.starts_with(
                "pricing.toml:30: [[discounts]] #3 from (4000) overlaps the previous tier"
            ),
            "{e}"
        );
    }

    #[test]
    fn refuses_gapped_tiers() {
        let e = refused(&with("from = 5000", "from = 6000"));
        assert!(
            e.starts_with("pricing.toml:30: [[discounts]] #3 from (6000) leaves a gap"),
            "{e}"
        );
    }

    #[test]
    fn refuses_unordered_tiers() {
        let e = refused(&with("from = 5000", "from = 500"));
        assert!(
            e.starts_with(
                "pricing.toml:30: [[discounts]] #3 from (500) is below the previous tier's from"
            ),
            "{e}"
        );
        let e = refused(&with("from = \"0\"", "from = \"1000\""));
        assert!(
            e.starts_with(
                "pricing.toml:22: [[discounts]] #1 from is 1000; the first tier must start at 0"
            ),
            "{e}"
        );
    }

    #[test]
    fn refuses_open_ended_tiers_before_the_last_and_a_closed_last() {
        let e = refused(&with("to = 5000\n", ""));
        assert!(
            e.starts_with("pricing.toml:25: [[discounts]] #2 omits `to`; only the last tier may"),
            "{e}"
        );
        let e = refused(&with("percent = 20", "percent = 20\nto = 9000"));
        assert!(
            e.starts_with("pricing.toml:32: [[discounts]] #3 is the last tier and must omit `to`"),
            "{e}"
        );
        let e = refused(&with("to = 5000", "to = 1000"));
        assert!(
            e.starts_with(
                "pricing.toml:27: [[discounts]] #2 to (1000) must be greater than its from"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_book_without_tiers_gives_no_discount() {
        let b = PriceBook::parse(BOOK_V2, "p").expect("valid");
        let r = UsageRecord {
            context: crate::identity::run::RunContext {
                customer_id: Some("acme".into()),
                ..Default::default()
            },
            gpu_seconds: dec("3600"),
            ..record()
        };
        assert_eq!(b.price(&r, dec("1000000")).discount, Decimal::ZERO);
    }

    /// A file in the temp dir, unique to this test run.
    fn temp_book(name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("mentat-pricing-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).expect("writes the temp book");
        path
    }

    #[test]
    fn reload_keeps_the_old_book_when_the_new_one_is_bad() {
        let handle = PriceBookHandle::new(book());
        let bad = temp_book(
            "bad",
            &with("cpu_per_core_hour = \"0.0420\"", "cpu_per_core_hour = -1"),
        );
        let e = handle.reload(&bad).expect_err("refused");
        assert!(
            e.to_string()
                .ends_with(":7: cpu_per_core_hour is negative (-1)"),
            "{e}"
        );
        assert_eq!(handle.current().version(), "2026-11-01");
        assert_eq!(*handle.current(), book());

        // A missing file is refused the same way.
        assert!(
            handle
                .reload(Path::new("/nonexistent/pricing.toml"))
                .is_err()
        );
        assert_eq!(handle.current().version(), "2026-11-01");

        // Changed prices under the same version are refused.
        let reused = temp_book(
            "reused",
            &with("gpu_per_hour = \"2.50\"", "gpu_per_hour = \"9\""),
        );
        assert!(matches!(
            handle.reload(&reused),
            Err(PricingError::VersionReused { .. })
        ));
        assert_eq!(handle.current().version(), "2026-11-01");

        // The same book again is fine; a good new one goes into force, in every clone.
        let same = temp_book("same", BOOK);
        handle.reload(&same).expect("the same book reloads");
        let good = temp_book("good", BOOK_V2);
        let other = handle.clone();
        handle.reload(&good).expect("a valid book reloads");
        assert_eq!(other.current().version(), "2026-12-01");

        for p in [bad, reused, same, good] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn load_names_the_path() {
        let path = temp_book("load", &with("currency = \"USD\"", "currency = \"XYZ\""));
        let e = PriceBook::load(&path).expect_err("refused").to_string();
        assert!(
            e.starts_with(&format!("{}:5: currency", path.display())),
            "{e}"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn present_rounds_half_even_to_minor_units() {
        assert_eq!(present(dec("0.125"), "USD"), "0.12");
        assert_eq!(present(dec("0.135"), "USD"), "0.14");
        assert_eq!(present(dec("0.1251"), "USD"), "0.13");
        assert_eq!(present(dec("2.5"), "USD"), "2.50");
        assert_eq!(present(dec("0.0000175"), "EUR"), "0.00");
        assert_eq!(present(dec("-0.001"), "USD"), "0.00");
        assert_eq!(present(dec("-1.005"), "USD"), "-1.00");
        assert_eq!(present(dec("2.5"), "JPY"), "2");
        assert_eq!(present(dec("3.5"), "KRW"), "4");
        assert_eq!(present(dec("1234"), "JPY"), "1234");
        assert_eq!(present(dec("0.0005"), "BHD"), "0.000");
        assert_eq!(present(dec("0.0015"), "KWD"), "0.002");
        assert_eq!(present(dec("7"), "TND"), "7.000");
        assert_eq!(present(dec("1.23456"), "CLF"), "1.2346");
    }

    #[test]
    fn currency_list_is_sorted_and_unique() {
        assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]));
        assert!(ISO_4217.len() >= 150);
        for c in ZERO_DECIMAL.iter().chain(THREE_DECIMAL).chain(FOUR_DECIMAL) {
            assert!(ISO_4217.contains(c), "{c}");
        }
    }
}
