//! Exact arithmetic for the ledger's sums, and the stored form of a `Decimal`.
//!
//! `Decimal` rounds a sum to 28 significant digits, so its `+` is not
//! associative: summing the same records raw and through hourly rollups (a
//! different grouping) could differ in the last digit. [`Exact`] is plain
//! integer arithmetic on a fixed point with 28 fractional digits (the most a
//! `Decimal` has), so every `Decimal` converts into it without loss and any
//! order or grouping of a sum gives the same value. A total is rounded to a
//! `Decimal` once, at the end ([`Exact::to_decimal`]).

use std::fmt;

use rust_decimal::Decimal;

/// Fractional digits kept: `Decimal`'s largest scale.
const FRAC_DIGITS: u32 = 28;
/// 10^28: one unit in `frac`.
const ONE: i128 = 10_000_000_000_000_000_000_000_000_000;
/// `Decimal`'s mantissa is 96 bits.
const MANTISSA_LIMIT: u128 = 1 << 96;

/// An exact sum: `units + frac / 10^28`, with `0 <= frac < 10^28`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Exact {
    /// The floor of the value.
    units: i128,
    /// The rest, in units of 10^-28; never negative.
    frac: i128,
}

impl Exact {
    /// Zero.
    pub const ZERO: Exact = Exact { units: 0, frac: 0 };

    /// `mantissa × 10^-scale`, or None where scale > 28 (no `Decimal` has one).
    pub fn from_parts(mantissa: i128, scale: u32) -> Option<Exact> {
        if scale > FRAC_DIGITS {
            return None;
        }
        let p = 10i128.pow(scale);
        Some(Exact {
            units: mantissa.div_euclid(p),
            frac: mantissa.rem_euclid(p) * 10i128.pow(FRAC_DIGITS - scale),
        })
    }

    /// The exact value of `d`.
    pub fn from_decimal(d: Decimal) -> Exact {
        // A Decimal's scale is at most 28 and its mantissa 96 bits, so this
        // cannot fail; ZERO is unreachable.
        Exact::from_parts(d.mantissa(), d.scale()).unwrap_or(Exact::ZERO)
    }

    /// `self + o`, or None on overflow (beyond ±1.7·10^38).
    pub fn checked_add(self, o: Exact) -> Option<Exact> {
        let mut units = self.units.checked_add(o.units)?;
        // Both fractions are below 10^28, so their sum cannot overflow i128.
        let mut frac = self.frac + o.frac;
        if frac >= ONE {
            frac -= ONE;
            units = units.checked_add(1)?;
        }
        Some(Exact { units, frac })
    }

    /// `-self`, or None on overflow.
    pub fn checked_neg(self) -> Option<Exact> {
        if self.frac == 0 {
            Some(Exact {
                units: self.units.checked_neg()?,
                frac: 0,
            })
        } else {
            Some(Exact {
                units: self.units.checked_neg()?.checked_sub(1)?,
                frac: ONE - self.frac,
            })
        }
    }

    /// `self - o`, or None on overflow.
    pub fn checked_sub(self, o: Exact) -> Option<Exact> {
        self.checked_add(o.checked_neg()?)
    }

    /// The nearest `Decimal` (ties to even, at the largest scale whose
    /// mantissa fits 96 bits), normalised; None beyond `Decimal`'s range.
    pub fn to_decimal(self) -> Option<Decimal> {
        for scale in (0..=FRAC_DIGITS).rev() {
            let div = 10i128.pow(FRAC_DIGITS - scale);
            let (q, r) = (self.frac / div, self.frac % div);
            // floor(value × 10^scale), then round the remainder r/div.
            let Some(mut m) = self
                .units
                .checked_mul(10i128.pow(scale))
                .and_then(|u| u.checked_add(q))
            else {
                continue;
            };
            let half = div / 2;
            if div > 1 && (r > half || (r == half && m.rem_euclid(2) == 1)) {
                m += 1;
            }
            if m.unsigned_abs() < MANTISSA_LIMIT {
                return Decimal::try_from_i128_with_scale(m, scale)
                    .ok()
                    .map(|d| d.normalize());
            }
        }
        None
    }

    /// Parses `[-]digits[.digits]` with at most 28 fractional digits: what
    /// `Display` writes and what `Decimal` prints.
    pub fn parse(s: &str) -> Option<Exact> {
        let (negative, body) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        if int.is_empty()
            || frac.len() > FRAC_DIGITS as usize
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || (body.contains('.') && frac.is_empty())
        {
            return None;
        }
        let mut units: i128 = 0;
        for b in int.bytes() {
            units = units.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        let mut f: i128 = 0;
        for b in frac.bytes() {
            f = f * 10 + i128::from(b - b'0');
        }
        // Length was checked above, so this stays below 10^28.
        f *= 10i128.pow(FRAC_DIGITS - frac.len() as u32);
        let magnitude = Exact { units, frac: f };
        if negative {
            magnitude.checked_neg()
        } else {
            Some(magnitude)
        }
    }
}

impl fmt::Display for Exact {
    /// `[-]units[.frac]`, without trailing zeros: exact, and parsed back by [`Exact::parse`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sign, units, frac) = if self.units < 0 && self.frac > 0 {
            // -3 + 0.25 = -2.75: the magnitude is (|units| - 1) + (1 - frac).
            ("-", self.units.unsigned_abs() - 1, ONE - self.frac)
        } else if self.units < 0 {
            ("-", self.units.unsigned_abs(), 0)
        } else {
            ("", self.units.unsigned_abs(), self.frac)
        };
        if frac == 0 {
            return write!(f, "{sign}{units}");
        }
        let digits = format!("{frac:028}");
        write!(f, "{sign}{units}.{}", digits.trim_end_matches('0'))
    }
}

/// A `Decimal` as the ledger stores it: one byte of sign (0x80) and scale,
/// then the mantissa's magnitude in little-endian bytes, high zero bytes
/// dropped (1 to 13 bytes). Exact, keeps the scale, and about half the size
/// of the decimal text; it is our own layout, so no crate upgrade changes it.
#[derive(Clone, Copy, Debug)]
pub struct DecBlob {
    len: u8,
    bytes: [u8; 13],
}

impl DecBlob {
    /// The stored form of `d`, or None for a plain zero (stored as NULL).
    pub fn of(d: &Decimal) -> Option<DecBlob> {
        let m = d.mantissa();
        if m == 0 && d.scale() == 0 {
            return None;
        }
        let mut bytes = [0u8; 13];
        // scale ≤ 28 fits in the low 7 bits.
        bytes[0] = (d.scale() as u8) | if m < 0 { 0x80 } else { 0 };
        let le = m.unsigned_abs().to_le_bytes();
        let used = 16 - (m.unsigned_abs().leading_zeros() / 8) as usize;
        // A 96-bit mantissa needs at most 12 bytes.
        let used = used.min(12);
        bytes[1..=used].copy_from_slice(&le[..used]);
        Some(DecBlob {
            len: 1 + used as u8,
            bytes,
        })
    }

    /// The stored bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// (mantissa, scale) of stored bytes, or None if they are not a `Decimal`.
    pub fn parts(b: &[u8]) -> Option<(i128, u32)> {
        let (&head, mag) = b.split_first()?;
        if mag.len() > 12 {
            return None;
        }
        let scale = u32::from(head & 0x7f);
        if scale > FRAC_DIGITS {
            return None;
        }
        let mut le = [0u8; 16];
        le[..mag.len()].copy_from_slice(mag);
        let m = i128::from_le_bytes(le);
        if m.unsigned_abs() >= MANTISSA_LIMIT {
            return None;
        }
        Some((if head & 0x80 != 0 { -m } else { m }, scale))
    }

    /// The `Decimal` of stored bytes (NULL is zero).
    pub fn decode(b: Option<&[u8]>) -> Option<Decimal> {
        match b {
            None => Some(Decimal::ZERO),
            Some(b) => {
                let (m, scale) = DecBlob::parts(b)?;
                Decimal::try_from_i128_with_scale(m, scale).ok()
            }
        }
    }

    /// The exact value of stored bytes (NULL is zero).
    pub fn exact(b: Option<&[u8]>) -> Option<Exact> {
        match b {
            None => Some(Exact::ZERO),
            Some(b) => {
                let (m, scale) = DecBlob::parts(b)?;
                Exact::from_parts(m, scale)
            }
        }
    }
}

impl rusqlite::ToSql for DecBlob {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(
            rusqlite::types::ValueRef::Blob(self.as_slice()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("decimal")
    }

    #[test]
    fn sums_are_exact_and_order_free() {
        // Three values whose Decimal sum rounds differently by grouping.
        // a + 4e-28 needs 29 digits: Decimal rounds it away, twice.
        let a = d("8.000000000000000000000000001");
        let b = d("0.0000000000000000000000000004");
        let c = d("0.0000000000000000000000000004");
        assert_ne!(
            (a + b) + c,
            a + (b + c),
            "Decimal itself is not associative"
        );
        let (ea, eb, ec) = (
            Exact::from_decimal(a),
            Exact::from_decimal(b),
            Exact::from_decimal(c),
        );
        let left = ea.checked_add(eb).and_then(|x| x.checked_add(ec));
        let right = eb.checked_add(ec).and_then(|x| ea.checked_add(x));
        assert_eq!(left, right);
        assert_eq!(
            left.map(|x| x.to_string()).as_deref(),
            Some("8.0000000000000000000000000018")
        );
    }

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "0",
            "1",
            "-1",
            "0.1",
            "-0.1",
            "-2.75",
            "123456789012345678901234567890.0000000000000000000000000001",
            "-0.0000000000000000000000000001",
        ] {
            let e = Exact::parse(s).expect(s);
            assert_eq!(e.to_string(), s);
        }
        assert_eq!(
            Exact::parse("1.50").map(|e| e.to_string()),
            Some("1.5".into())
        );
        for bad in [
            "",
            "-",
            ".5",
            "1.",
            "1e5",
            "1.2.3",
            "+1",
            "0.00000000000000000000000000001",
        ] {
            assert!(Exact::parse(bad).is_none(), "{bad}");
        }
        let x = d("-7.125");
        assert_eq!(
            Exact::from_decimal(x),
            Exact::parse("-7.125").expect("parses")
        );
        assert_eq!(Exact::from_decimal(x).to_decimal(), Some(x));
    }

    #[test]
    fn rounding_to_decimal_is_half_even_once() {
        // 29 significant digits: the last one must go.
        let e = Exact::parse("10.0000000000000000000000000005").expect("parses");
        assert_eq!(e.to_decimal(), Some(d("10.000000000000000000000000000")));
        let e = Exact::parse("10.0000000000000000000000000015").expect("parses");
        assert_eq!(e.to_decimal(), Some(d("10.000000000000000000000000002")));
        let e = Exact::parse("-10.0000000000000000000000000015").expect("parses");
        assert_eq!(e.to_decimal(), Some(d("-10.000000000000000000000000002")));
        let big = Exact::parse("79228162514264337593543950336").expect("parses");
        assert_eq!(big.to_decimal(), None, "2^96 is beyond Decimal");
        let sub = Exact::parse("1").and_then(|o| o.checked_sub(Exact::parse("1.25")?));
        assert_eq!(sub.and_then(Exact::to_decimal), Some(d("-0.25")));
    }

    #[test]
    fn blobs_keep_value_and_scale() {
        for s in [
            "0.000",
            "1",
            "-1",
            "0.0000277777777777777777777778",
            "79228162514264337593543950335",
            "-7.9228162514264337593543950335",
            "123.4500",
        ] {
            let v = d(s);
            let blob = DecBlob::of(&v).expect("non-zero or scaled");
            let back = DecBlob::decode(Some(blob.as_slice())).expect("decodes");
            assert_eq!(back.to_string(), v.to_string(), "{s}");
            assert_eq!(
                DecBlob::exact(Some(blob.as_slice())),
                Some(Exact::from_decimal(v))
            );
        }
        assert!(DecBlob::of(&Decimal::ZERO).is_none());
        assert_eq!(DecBlob::decode(None), Some(Decimal::ZERO));
        assert!(DecBlob::parts(&[29, 1]).is_none(), "scale 29");
        assert!(DecBlob::parts(&[0; 14]).is_none(), "too long");
        assert!(DecBlob::parts(&[]).is_none());
    }
}
