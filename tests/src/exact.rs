//! Exact decimal arithmetic for comparing the ledger's sums.
//!
//! The agent prints quantities and money as decimal strings with up to 28 fractional
//! digits (`rust_decimal`). Adding `Decimal`s rounds once a sum outgrows 96 bits, so
//! the tests parse each value with `rust_decimal` and add them as integers in units of
//! 10⁻²⁸ (`i128`: exact up to ±1.7·10¹⁰ units, far above anything a test run meters).

use anyhow::{Context, Result, bail};
use rust_decimal::Decimal;

/// Fractional digits of the fixed point: a `Decimal`'s largest scale.
pub const SCALE: u32 = 28;

/// An exact decimal in units of 10⁻²⁸.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Exact(pub i128);

impl Exact {
    pub const ZERO: Exact = Exact(0);

    /// `d` exactly; fails only past ±1.7·10¹⁰.
    pub fn from_decimal(d: Decimal) -> Result<Exact> {
        let factor = 10i128
            .checked_pow(SCALE - d.scale())
            .context("decimal scale above 28")?;
        d.mantissa()
            .checked_mul(factor)
            .map(Exact)
            .with_context(|| format!("{d} is too large for the tests' fixed point"))
    }

    /// A decimal string (or an integer) exactly.
    pub fn parse(s: &str) -> Result<Exact> {
        let d: Decimal = s
            .parse()
            .with_context(|| format!("{s:?} is not a decimal"))?;
        Exact::from_decimal(d)
    }

    /// An integer exactly.
    pub fn from_u64(n: u64) -> Exact {
        Exact(i128::from(n) * 10i128.pow(SCALE))
    }

    /// The sum; fails on overflow.
    #[allow(clippy::should_implement_trait)] // fallible: Result, not `Add`
    pub fn add(self, other: Exact) -> Result<Exact> {
        match self.0.checked_add(other.0) {
            Some(v) => Ok(Exact(v)),
            None => bail!("exact sum overflowed"),
        }
    }

    /// The nearest f64, for comparing with values that crossed the wire as doubles.
    pub fn to_f64(self) -> f64 {
        self.0 as f64 / 1e28
    }
}

impl std::fmt::Display for Exact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let unit = 10u128.pow(SCALE);
        let frac = format!("{:028}", abs % unit);
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            write!(f, "{sign}{}", abs / unit)
        } else {
            write!(f, "{sign}{}.{frac}", abs / unit)
        }
    }
}

/// A JSON value holding a decimal: a string ("0.25") or a number (an integer count).
pub fn exact_json(v: &serde_json::Value) -> Result<Exact> {
    match v {
        serde_json::Value::String(s) => Exact::parse(s),
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(u) => Ok(Exact::from_u64(u)),
            None => Exact::parse(&n.to_string()),
        },
        serde_json::Value::Null => Ok(Exact::ZERO),
        other => bail!("{other} is not a decimal"),
    }
}

/// Whether two f64 agree to `rel` relative to the larger magnitude (both zero agrees).
pub fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_adds_and_prints_exactly() {
        let a = Exact::parse("0.0000000003582483333333333333").expect("a");
        let b = Exact::parse("1.5").expect("b");
        let s = a.add(b).expect("sum");
        assert_eq!(s.to_string(), "1.5000000003582483333333333333");
        assert_eq!(Exact::from_u64(3).to_string(), "3");
        assert_eq!(Exact(-5).to_string(), "-0.0000000000000000000000000005");
        assert!(close(1.0, 1.0 + 1e-12, 1e-9));
        assert!(!close(1.0, 1.1, 1e-9));
        assert!(close(0.0, 0.0, 1e-9));
    }
}
