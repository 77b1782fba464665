//! Token prices per model: the book's `[models."name"]` tables in, a model
//! name's prices and one call's token cost out.
//!
//! # Which entry prices a model name
//!
//! 1. The entry whose key is the name, exactly.
//! 2. The entry listing the name in its `aliases`, exactly.
//! 3. The name without a date suffix (`-2024-07-18`, `-20241022`, `-0613`,
//!    `@20240620`), matched as in 1 and 2. Where several bases fit, the
//!    longest wins, so `gpt-4o-mini-2024-07-18` is `gpt-4o-mini`, never
//!    `gpt-4o`.
//!
//! No key or alias may name two entries (refused when the book loads), so
//! each name resolves to at most one entry.
//!
//! # Invariant: no token is priced twice
//!
//! Cached input (read or written) is part of input, reasoning output part of
//! output, and the per-modality counts parts of either. Each part is clamped
//! to what is left of its whole before it is priced, in a fixed order:
//! input = cache read + cache creation + image + audio + video + text + the
//! rest (at `input_per_1k`); output = reasoning + audio + text + the rest (at
//! `output_per_1k`). A modality count is priced at its own price only where
//! the book gives one; otherwise those tokens stay in the rest. So the tokens
//! priced always add up to exactly `input + output`.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;
use toml::Spanned;

use super::{Cx, PricingError, RawNumber, product, sum};
use crate::report::record::TokenUsage;

/// A model's token prices, per 1000 tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPrice {
    /// Input tokens not otherwise priced below.
    pub input_per_1k: Decimal,
    /// Output tokens not otherwise priced below.
    pub output_per_1k: Decimal,
    /// Input tokens read from the provider's prompt cache (default: input price).
    pub cache_read_input_per_1k: Decimal,
    /// Input tokens written to the provider's prompt cache (default: input price).
    pub cache_creation_input_per_1k: Decimal,
    /// Reasoning output tokens (default: output price).
    pub reasoning_output_per_1k: Decimal,
    /// Uncached text input, in place of the input price, where given.
    pub text_input_per_1k: Option<Decimal>,
    /// Uncached image input, in place of the input price, where given.
    pub image_input_per_1k: Option<Decimal>,
    /// Uncached audio input, in place of the input price, where given.
    pub audio_input_per_1k: Option<Decimal>,
    /// Uncached video input, in place of the input price, where given.
    pub video_input_per_1k: Option<Decimal>,
    /// Non-reasoning text output, in place of the output price, where given.
    pub text_output_per_1k: Option<Decimal>,
    /// Audio output, in place of the output price, where given.
    pub audio_output_per_1k: Option<Decimal>,
}

/// Prices for calls whose input exceeds a size (long-context pricing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongContext {
    /// A call with more input tokens than this (cached ones included) is
    /// priced wholly at `price`, its output too, as providers charge.
    pub above_input_tokens: u64,
    /// The prices of such a call.
    pub price: ModelPrice,
}

/// One `[models."name"]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    /// The prices of a call below every long-context bound.
    pub price: ModelPrice,
    /// Ascending by `above_input_tokens`.
    pub long_context: Vec<LongContext>,
    /// Other names providers answer with for this model.
    pub aliases: Vec<String>,
}

impl ModelEntry {
    /// The prices of a call with `input` tokens: the highest long-context
    /// tier whose bound it exceeds, else the base prices.
    pub fn price_for(&self, input: u64) -> &ModelPrice {
        self.long_context
            .iter()
            .rev()
            .find(|t| input > t.above_input_tokens)
            .map_or(&self.price, |t| &t.price)
    }
}

/// The book's models and their aliases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Models {
    entries: BTreeMap<String, ModelEntry>,
    /// alias → entry key.
    aliases: BTreeMap<String, String>,
}

impl Models {
    /// The entries by key.
    pub fn entries(&self) -> &BTreeMap<String, ModelEntry> {
        &self.entries
    }

    /// The entry that prices `name` and its key (see the module doc for the order).
    pub fn resolve(&self, name: &str) -> Option<(&str, &ModelEntry)> {
        self.exact(name).or_else(|| {
            // Rightmost split first: the longest base wins.
            name.char_indices()
                .rev()
                .filter(|&(i, c)| (c == '-' || c == '@') && i > 0 && is_date_suffix(&name[i + 1..]))
                .find_map(|(i, _)| self.exact(&name[..i]))
        })
    }

    fn exact(&self, name: &str) -> Option<(&str, &ModelEntry)> {
        let key = self.aliases.get(name).map_or(name, String::as_str);
        self.entries
            .get_key_value(key)
            .map(|(k, e)| (k.as_str(), e))
    }
}

/// `2024-07-18`, `20241022` (a valid month and day), or four digits
/// (`0613`, `2407`: OpenAI's MMDD and Mistral's YYMM).
fn is_date_suffix(s: &str) -> bool {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let month_day = |m: &str, d: &str| {
        let (Ok(m), Ok(d)) = (m.parse::<u8>(), d.parse::<u8>()) else {
            return false;
        };
        (1..=12).contains(&m) && (1..=31).contains(&d)
    };
    match s.len() {
        4 => digits(s),
        8 => digits(s) && month_day(&s[4..6], &s[6..]),
        10 => {
            let b = s.as_bytes();
            b[4] == b'-'
                && b[7] == b'-'
                && digits(&s[..4])
                && digits(&s[5..7])
                && digits(&s[8..])
                && month_day(&s[5..7], &s[8..])
        }
        _ => false,
    }
}

/// The price keys a model table and its long-context tiers share, in the
/// order [`Keys`] holds them.
pub(super) const PRICE_KEYS: [&str; 11] = [
    "input_per_1k",
    "output_per_1k",
    "cache_read_input_per_1k",
    "cache_creation_input_per_1k",
    "reasoning_output_per_1k",
    "text_input_per_1k",
    "image_input_per_1k",
    "audio_input_per_1k",
    "video_input_per_1k",
    "text_output_per_1k",
    "audio_output_per_1k",
];

/// The price keys as written, in [`PRICE_KEYS`] order.
type Keys<'a> = [Option<&'a RawNumber>; 11];

/// Declares a raw table holding the price keys plus `extra` fields, and its
/// [`Keys`] view (serde's `flatten` cannot be used with `deny_unknown_fields`).
macro_rules! raw_prices {
    ($name:ident { $($extra:ident : $ty:ty),* $(,)? }) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $name {
            input_per_1k: Option<RawNumber>,
            output_per_1k: Option<RawNumber>,
            cache_read_input_per_1k: Option<RawNumber>,
            cache_creation_input_per_1k: Option<RawNumber>,
            reasoning_output_per_1k: Option<RawNumber>,
            text_input_per_1k: Option<RawNumber>,
            image_input_per_1k: Option<RawNumber>,
            audio_input_per_1k: Option<RawNumber>,
            video_input_per_1k: Option<RawNumber>,
            text_output_per_1k: Option<RawNumber>,
            audio_output_per_1k: Option<RawNumber>,
            $($extra: $ty,)*
        }

        impl $name {
            fn keys(&self) -> Keys<'_> {
                [
                    self.input_per_1k.as_ref(),
                    self.output_per_1k.as_ref(),
                    self.cache_read_input_per_1k.as_ref(),
                    self.cache_creation_input_per_1k.as_ref(),
                    self.reasoning_output_per_1k.as_ref(),
                    self.text_input_per_1k.as_ref(),
                    self.image_input_per_1k.as_ref(),
                    self.audio_input_per_1k.as_ref(),
                    self.video_input_per_1k.as_ref(),
                    self.text_output_per_1k.as_ref(),
                    self.audio_output_per_1k.as_ref(),
                ]
            }
        }
    };
}

raw_prices!(RawModel {
    aliases: Option<Vec<Spanned<String>>>,
    long_context: Option<Vec<Spanned<RawLongContext>>>,
});
raw_prices!(RawLongContext {
    above_input_tokens: Option<Spanned<i64>>,
});

/// Validates the `[models]` tables: prices, long-context tiers (ascending,
/// distinct bounds) and aliases (no name for two entries).
pub(super) fn models(
    cx: &Cx<'_>,
    raw: BTreeMap<String, Spanned<RawModel>>,
) -> Result<Models, PricingError> {
    let mut out = Models::default();
    let mut alias_spans = Vec::new();
    for (name, spanned) in raw {
        let header = spanned.span();
        let mut m = spanned.into_inner();
        let raw_tiers = m.long_context.take().unwrap_or_default();
        let raw_aliases = m.aliases.take().unwrap_or_default();
        let base = m.keys();
        let price = prices(cx, &format!("models.{name:?}"), header.clone(), &base, None)?;
        let mut long_context: Vec<LongContext> = Vec::new();
        for (i, t) in raw_tiers.into_iter().enumerate() {
            let span = t.span();
            let t = t.into_inner();
            let what = format!("models.{name:?}.long_context #{}", i + 1);
            let Some(above) = &t.above_input_tokens else {
                return Err(cx.invalid(
                    span,
                    format!("{what} has no above_input_tokens (the input size above which its prices apply)"),
                ));
            };
            let bound = u64::try_from(*above.get_ref()).map_err(|_| {
                cx.invalid(
                    above.span(),
                    format!("{what} above_input_tokens is negative"),
                )
            })?;
            if let Some(prev) = long_context.last()
                && bound <= prev.above_input_tokens
            {
                return Err(cx.invalid(
                    above.span(),
                    format!(
                        "{what} above_input_tokens ({bound}) is not above the previous tier's ({}); \
                         list tiers in ascending order",
                        prev.above_input_tokens
                    ),
                ));
            }
            let price = prices(cx, &what, span, &base, Some(&t.keys()))?;
            long_context.push(LongContext {
                above_input_tokens: bound,
                price,
            });
        }
        let mut aliases = Vec::new();
        for a in raw_aliases {
            let span = a.span();
            let alias = a.into_inner();
            if alias.is_empty() {
                return Err(cx.invalid(span, format!("models.{name:?} has an empty alias")));
            }
            alias_spans.push((name.clone(), alias.clone(), span));
            aliases.push(alias);
        }
        out.entries.insert(
            name,
            ModelEntry {
                price,
                long_context,
                aliases,
            },
        );
    }
    // Aliases are checked once every key is known, so an alias naming a
    // model listed later is caught too.
    for (key, alias, span) in alias_spans {
        let clash = if out.entries.contains_key(&alias) {
            Some(alias.clone())
        } else {
            out.aliases.get(&alias).cloned()
        };
        if let Some(other) = clash {
            return Err(cx.invalid(
                span,
                format!(
                    "models.{key:?} alias {alias:?} also names the entry {other:?}; \
                     a name may price only one model"
                ),
            ));
        }
        out.aliases.insert(alias, key);
    }
    Ok(out)
}

/// A tier's (or the base's) prices: a key the tier leaves out is the base's
/// written value, else its default (cache prices: the input price; reasoning:
/// the output price).
fn prices(
    cx: &Cx<'_>,
    what: &str,
    span: std::ops::Range<usize>,
    base: &Keys<'_>,
    tier: Option<&Keys<'_>>,
) -> Result<ModelPrice, PricingError> {
    let mut v = [None; 11];
    for (i, key) in PRICE_KEYS.iter().enumerate() {
        let raw = tier.and_then(|t| t[i]).or(base[i]);
        v[i] = raw
            .map(|r| cx.price(r, &format!("{what}.{key}")))
            .transpose()?;
    }
    let required = |i: usize| {
        v[i].ok_or_else(|| {
            cx.invalid(
                span.clone(),
                format!("{what} has no {} (write 0 to make it free)", PRICE_KEYS[i]),
            )
        })
    };
    let input = required(0)?;
    let output = required(1)?;
    Ok(ModelPrice {
        input_per_1k: input,
        output_per_1k: output,
        cache_read_input_per_1k: v[2].unwrap_or(input),
        cache_creation_input_per_1k: v[3].unwrap_or(input),
        reasoning_output_per_1k: v[4].unwrap_or(output),
        text_input_per_1k: v[5],
        image_input_per_1k: v[6],
        audio_input_per_1k: v[7],
        video_input_per_1k: v[8],
        text_output_per_1k: v[9],
        audio_output_per_1k: v[10],
    })
}

/// One call's tokens priced with `entry` (see the module doc): exact, one
/// division by 1000 at the end.
pub(super) fn usage_cost(entry: &ModelEntry, t: &TokenUsage, record_id: &str) -> Decimal {
    let m = entry.price_for(t.input);
    let mut parts = Vec::with_capacity(11);
    let mut take = |left: &mut u64, n: u64, price: Decimal| {
        let n = n.min(*left);
        *left -= n;
        parts.push(product(&[Decimal::from(n), price], Decimal::ONE, record_id));
    };
    let mut input = t.input;
    take(&mut input, t.cache_read_input, m.cache_read_input_per_1k);
    take(
        &mut input,
        t.cache_creation_input,
        m.cache_creation_input_per_1k,
    );
    for (n, price) in [
        (t.image_input, m.image_input_per_1k),
        (t.audio_input, m.audio_input_per_1k),
        (t.video_input, m.video_input_per_1k),
        (t.text_input, m.text_input_per_1k),
    ] {
        if let Some(p) = price {
            take(&mut input, n, p);
        }
    }
    let rest = input;
    take(&mut input, rest, m.input_per_1k);
    let mut output = t.output;
    take(&mut output, t.reasoning_output, m.reasoning_output_per_1k);
    for (n, price) in [
        (t.audio_output, m.audio_output_per_1k),
        (t.text_output, m.text_output_per_1k),
    ] {
        if let Some(p) = price {
            take(&mut output, n, p);
        }
    }
    let rest = output;
    take(&mut output, rest, m.output_per_1k);
    product(&[sum(&parts)], Decimal::ONE_THOUSAND, record_id)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::super::{PriceBook, tests_support::book_with};
    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).expect("a decimal literal")
    }

    const MODELS: &str = r#"
[models."m"]
input_per_1k = "0.002"
output_per_1k = "0.008"
cache_read_input_per_1k = "0.0005"
cache_creation_input_per_1k = "0.0025"
reasoning_output_per_1k = "0.012"
audio_input_per_1k = "0.04"
image_input_per_1k = "0.003"
audio_output_per_1k = "0.08"
aliases = ["m-latest"]
[[models."m".long_context]]
above_input_tokens = 200000
input_per_1k = "0.004"
output_per_1k = "0.016"

[models."n"]
input_per_1k = 1
output_per_1k = 2
[[models."n".long_context]]
above_input_tokens = 10
input_per_1k = 3

[models."gpt-4o"]
input_per_1k = "0.0025"
output_per_1k = "0.01"
[models."gpt-4o-2024-05-13"]
input_per_1k = "0.005"
output_per_1k = "0.015"
[models."gpt-4o-mini"]
input_per_1k = "0.00015"
output_per_1k = "0.0006"
aliases = ["4o-mini"]
[models."claude-3-5-sonnet"]
input_per_1k = "0.003"
output_per_1k = "0.015"
"#;

    fn book() -> PriceBook {
        book_with(MODELS).expect("the test book is valid")
    }

    fn cost(b: &PriceBook, t: &TokenUsage) -> Decimal {
        let (_, e) = b.models.resolve(&t.model).expect("a priced model");
        usage_cost(e, t, "r").normalize()
    }

    #[test]
    fn every_token_type_is_priced_once_at_its_price() {
        let t = TokenUsage {
            model: "m".into(),
            input: 10_000,
            cache_read_input: 2_000,
            cache_creation_input: 1_000,
            audio_input: 3_000,
            image_input: 500,
            text_input: 3_500,
            output: 4_000,
            reasoning_output: 1_000,
            audio_output: 500,
            text_output: 2_500,
            ..TokenUsage::default()
        };
        // per 1k: cache read 2000 × 0.0005 = 1; cache creation 1000 × 0.0025 = 2.5;
        // image 500 × 0.003 = 1.5; audio 3000 × 0.04 = 120; text has no price of its
        // own, so the rest 10000 − 2000 − 1000 − 500 − 3000 = 3500 × 0.002 = 7;
        // reasoning 1000 × 0.012 = 12; audio out 500 × 0.08 = 40; rest out
        // 4000 − 1000 − 500 = 2500 × 0.008 = 20. Σ = 204, / 1000 = 0.204.
        assert_eq!(cost(&book(), &t), dec("0.204"));
    }

    #[test]
    fn parts_claiming_more_than_their_whole_are_clamped() {
        let t = TokenUsage {
            model: "m".into(),
            input: 1_000,
            cache_read_input: 800,
            cache_creation_input: 800,
            audio_input: 800,
            output: 100,
            reasoning_output: 500,
            audio_output: 500,
            ..TokenUsage::default()
        };
        // cache read 800 × 0.0005 = 0.4; creation min(800, 200) = 200 × 0.0025 = 0.5;
        // audio: none left; reasoning min(500, 100) = 100 × 0.012 = 1.2; audio out:
        // none left. Σ = 2.1, / 1000. Summing the claims instead would bill 2,400
        // input tokens for 1,000.
        assert_eq!(cost(&book(), &t), dec("0.0021"));
    }

    #[test]
    fn with_one_price_for_everything_the_cost_is_input_plus_output() {
        // Every price 0.001 per 1k: whatever the parts claim, exactly input + output
        // tokens are priced (none twice, none dropped), so the cost is
        // (input + output) × 0.001 / 1000.
        let b = book_with(
            r#"[models."flat"]
input_per_1k = "0.001"
output_per_1k = "0.001"
cache_read_input_per_1k = "0.001"
cache_creation_input_per_1k = "0.001"
reasoning_output_per_1k = "0.001"
text_input_per_1k = "0.001"
image_input_per_1k = "0.001"
audio_input_per_1k = "0.001"
video_input_per_1k = "0.001"
text_output_per_1k = "0.001"
audio_output_per_1k = "0.001"
"#,
        )
        .expect("valid");
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |bound: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % bound
        };
        for _ in 0..2_000 {
            let t = TokenUsage {
                model: "flat".into(),
                input: next(5_000),
                cache_read_input: next(5_000),
                cache_creation_input: next(5_000),
                text_input: next(5_000),
                image_input: next(5_000),
                audio_input: next(5_000),
                video_input: next(5_000),
                output: next(5_000),
                reasoning_output: next(5_000),
                text_output: next(5_000),
                audio_output: next(5_000),
                ..TokenUsage::default()
            };
            let want = Decimal::from(t.input + t.output) * dec("0.001") / Decimal::ONE_THOUSAND;
            assert_eq!(cost(&b, &t), want.normalize(), "{t:?}");
        }
    }

    #[test]
    fn a_long_context_call_is_priced_wholly_at_its_tier() {
        let b = book();
        let call = |input: u64, cached: u64| TokenUsage {
            model: "m".into(),
            input,
            cache_read_input: cached,
            output: 1_000,
            ..TokenUsage::default()
        };
        // At the bound: base. 200000 × 0.002 = 400; 1000 × 0.008 = 8; 408 / 1000.
        assert_eq!(cost(&b, &call(200_000, 0)), dec("0.408"));
        // Above it: the tier, output too; the cache price the tier leaves out is the
        // base's written 0.0005. 1 × 0.0005 + 200000 × 0.004 + 1000 × 0.016 = 816.0005.
        assert_eq!(cost(&b, &call(200_001, 1)), dec("0.8160005"));
        // A cache price neither writes defaults to the tier's own input price.
        let n = &b.models.entries()["n"];
        assert_eq!(n.long_context[0].price.cache_read_input_per_1k, dec("3"));
        assert_eq!(n.long_context[0].price.output_per_1k, dec("2"));
        assert_eq!(n.price.cache_read_input_per_1k, dec("1"));
    }

    #[test]
    fn provider_names_resolve_to_the_book_entry_longest_first() {
        let b = book();
        let resolved = |name: &str| b.resolve_model(name);
        for (name, want) in [
            ("gpt-4o-mini-2024-07-18", Some("gpt-4o-mini")),
            ("gpt-4o-2024-08-06", Some("gpt-4o")),
            // Listed itself: its own (higher) price, not gpt-4o's.
            ("gpt-4o-2024-05-13", Some("gpt-4o-2024-05-13")),
            ("claude-3-5-sonnet-20241022", Some("claude-3-5-sonnet")),
            ("claude-3-5-sonnet@20240620", Some("claude-3-5-sonnet")),
            ("gpt-4o-0613", Some("gpt-4o")),
            ("4o-mini", Some("gpt-4o-mini")),
            ("4o-mini-2024-07-18", Some("gpt-4o-mini")),
            ("m-latest", Some("m")),
            // Not dates, or not a suffix of a listed name.
            ("gpt-4o-mini-2024-13-18", None),
            ("gpt-4o-mini-20241340", None),
            ("gpt-4o-mini-turbo", None),
            ("gpt-4o-minimal", None),
            ("gpt-4o-123", None),
            ("-2024-07-18", None),
            ("xgpt-4o", None),
            ("gpt-4", None),
            ("", None),
        ] {
            assert_eq!(resolved(name), want, "{name}");
        }
        let t = |model: &str| TokenUsage {
            model: model.into(),
            input: 3_023,
            output: 1_047,
            ..TokenUsage::default()
        };
        // The issue's case: 3023 × 0.00015 + 1047 × 0.0006 = 1.08165, / 1000.
        assert_eq!(cost(&b, &t("gpt-4o-mini-2024-07-18")), dec("0.00108165"));
        assert_eq!(cost(&b, &t("gpt-4o-mini")), dec("0.00108165"));
        assert!(b.has_model("gpt-4o-mini-2024-07-18"));
    }

    #[test]
    fn a_name_for_two_entries_is_refused_with_its_line() {
        let e = book_with(
            r#"[models."a"]
input_per_1k = 1
output_per_1k = 1
aliases = ["b"]
[models."b"]
input_per_1k = 1
output_per_1k = 1
"#,
        )
        .expect_err("an alias naming another model");
        assert!(e.contains(r#"alias "b" also names the entry "b""#), "{e}");
        let line: usize = e
            .split(':')
            .nth(1)
            .and_then(|l| l.parse().ok())
            .expect("a line number");
        let text = super::super::tests_support::with_resources(
            r#"[models."a"]
input_per_1k = 1
output_per_1k = 1
aliases = ["b"]
"#,
        );
        assert_eq!(text.lines().nth(line - 1), Some(r#"aliases = ["b"]"#));
        let e = book_with(
            r#"[models."a"]
input_per_1k = 1
output_per_1k = 1
aliases = ["c"]
[models."b"]
input_per_1k = 1
output_per_1k = 1
aliases = ["c"]
"#,
        )
        .expect_err("one alias for two models");
        assert!(e.contains("also names the entry"), "{e}");
    }

    #[test]
    fn malformed_model_tables_are_refused() {
        for (text, want) in [
            ("[models.\"a\"]\noutput_per_1k = 1\n", "has no input_per_1k"),
            (
                "[models.\"a\"]\ninput_per_1k = 1\noutput_per_1k = 1\n[[models.\"a\".long_context]]\ninput_per_1k = 2\n",
                "has no above_input_tokens",
            ),
            (
                "[models.\"a\"]\ninput_per_1k = 1\noutput_per_1k = 1\n[[models.\"a\".long_context]]\nabove_input_tokens = 10\n[[models.\"a\".long_context]]\nabove_input_tokens = 10\n",
                "is not above the previous tier's",
            ),
            (
                "[models.\"a\"]\ninput_per_1k = 1\noutput_per_1k = 1\naudio_input_per_1k = \"-1\"\n",
                "audio_input_per_1k is negative",
            ),
            (
                "[models.\"a\"]\ninput_per_1k = 1\noutput_per_1k = 1\nmystery_per_1k = 1\n",
                "unknown field",
            ),
            (
                "[models.\"a\"]\ninput_per_1k = 1\noutput_per_1k = 1\naliases = [\"\"]\n",
                "empty alias",
            ),
        ] {
            let e = book_with(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn the_book_round_trips_through_its_text() {
        let b = book();
        let again = PriceBook::parse(&b.to_toml(), "again").expect("its own text is valid");
        assert_eq!(again, b);
        let shipped = PriceBook::parse(crate::pricing::DEFAULT_BOOK, "shipped").expect("valid");
        assert_eq!(
            PriceBook::parse(&shipped.to_toml(), "again").expect("valid"),
            shipped
        );
    }
}
