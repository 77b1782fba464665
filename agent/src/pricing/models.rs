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
