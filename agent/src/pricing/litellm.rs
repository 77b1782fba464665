//! `pricing import`: LiteLLM's `model_prices_and_context_window.json` in (the
//! price list many LLM projects share), a versioned price book's TOML out.
//!
//! Exactness: every price is read from the number's text in the JSON
//! (serde_json's `RawValue`), never through an `f64`, so `1.5e-07` per token
//! is exactly `0.00015` per 1000. The output is parsed back with
//! [`PriceBook::parse`] before it is returned, so what is printed is a book
//! the agent loads.
//!
//! What is read, per entry (standard tier; LiteLLM's `_batches`, `_flex`,
//! `_priority`, per-second, per-image and per-character prices are not token
//! prices of a call and are left out, counted in [`Import::ignored_keys`]):
//!
//! | LiteLLM key | book key |
//! |---|---|
//! | `input_cost_per_token` | `input_per_1k` |
//! | `output_cost_per_token` | `output_per_1k` |
//! | `cache_read_input_token_cost` | `cache_read_input_per_1k` |
//! | `cache_creation_input_token_cost` | `cache_creation_input_per_1k` |
//! | `output_cost_per_reasoning_token` | `reasoning_output_per_1k` |
//! | `input_cost_per_{image,audio,video}_token` | `{image,audio,video}_input_per_1k` |
//! | `output_cost_per_audio_token` | `audio_output_per_1k` |
//! | any of the first four or `input_cost_per_audio_token` + `_above_{N}k_tokens` | a `long_context` tier with `above_input_tokens = N·1000` |
//!
//! An entry without both `input_cost_per_token` and `output_cost_per_token`
//! (image, speech, per-second models) or with a price that is not a
//! non-negative number is skipped and counted by reason; nothing is skipped
//! silently. The resource prices and discounts come from a base book.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::value::RawValue;

use super::{
    PriceBook, PricingError, decimal_from_text,
    models::{Models, PRICE_KEYS},
    text::{dec, quote},
};
use crate::report::record::stable_id;

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not a JSON object of model entries.
    #[error("{origin}: not a LiteLLM model price file: {reason}")]
    Format {
        /// The file.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The base book's currency is not the file's.
    #[error(
        "the base book is in {base}, the imported prices in {currency}: a book has one currency \
         (give --base a book in {currency})"
    )]
    Currency {
        /// The base book's currency.
        base: String,
        /// The currency the file's prices are in.
        currency: String,
    },
    /// The book made from the file does not validate.
    #[error("the imported book is invalid: {0}")]
    Book(#[from] PricingError),
}

/// A converted file.
#[derive(Debug)]
pub struct Import {
    /// The book's TOML text.
    pub text: String,
    /// The book, as the agent reads `text`.
    pub book: PriceBook,
    /// Models written.
    pub imported: usize,
    /// Entries skipped, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Cost keys present in imported entries but not read, with how many entries had each.
    pub ignored_keys: BTreeMap<String, usize>,
}

/// LiteLLM cost keys → book keys (index in [`PRICE_KEYS`]).
const KEYS: [(&str, usize); 9] = [
    ("input_cost_per_token", 0),
    ("output_cost_per_token", 1),
    ("cache_read_input_token_cost", 2),
    ("cache_creation_input_token_cost", 3),
    ("output_cost_per_reasoning_token", 4),
    ("input_cost_per_image_token", 6),
    ("input_cost_per_audio_token", 7),
    ("input_cost_per_video_token", 8),
    ("output_cost_per_audio_token", 10),
];

/// The keys whose `_above_{N}k_tokens` variants make long-context tiers.
const TIERED: [&str; 5] = [
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "input_cost_per_audio_token",
];

/// Prices as written for one model or tier, in [`PRICE_KEYS`] order.
type Written = [Option<Decimal>; 11];

/// Converts `json` (LiteLLM's format; `origin` names it) into a book with
/// `base`'s resource prices and discounts, `version` (default: `litellm-`
/// and a hash of the file, so another file is another version) and
/// `currency` (the file's prices' currency; must be the base's).
pub fn import(
    json: &str,
    origin: &str,
    base: &PriceBook,
    version: Option<&str>,
    currency: &str,
) -> Result<Import, ImportError> {
    if base.currency != currency {
        return Err(ImportError::Currency {
            base: base.currency.clone(),
            currency: currency.to_string(),
        });
    }
    let format = |reason: String| ImportError::Format {
        origin: origin.to_string(),
        reason,
    };
    let entries: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(json).map_err(|e| format(e.to_string()))?;
    if entries.is_empty() {
        return Err(format("it lists no models".into()));
    }

    let mut out = Import {
        text: String::new(),
        book: base.clone(),
        imported: 0,
        skipped: BTreeMap::new(),
        ignored_keys: BTreeMap::new(),
    };
    let mut models = String::new();
    for (name, raw) in &entries {
        if name == "sample_spec" {
            *out.skipped
                .entry("the format's sample entry".into())
                .or_default() += 1;
            continue;
        }
        match entry(raw) {
            Ok((written, tiers, ignored)) => {
                models.push_str(&format!("\n[models.{}]\n", quote(name)));
                write(&mut models, &written);
                for (bound, w) in &tiers {
                    models.push_str(&format!("[[models.{}.long_context]]\n", quote(name)));
                    models.push_str(&format!("above_input_tokens = {bound}\n"));
                    write(&mut models, w);
                }
                for k in ignored {
                    *out.ignored_keys.entry(k).or_default() += 1;
                }
                out.imported += 1;
            }
            Err(reason) => *out.skipped.entry(reason).or_default() += 1,
        }
    }

    let version = version.map_or_else(
        || format!("litellm-{}", &stable_id(&[json.as_bytes()])[..16]),
        str::to_string,
    );
    let mut head = base.clone();
    head.version = version;
    head.models = Models::default();
    let comment: String = origin.chars().filter(|c| !c.is_control()).collect();
    out.text = format!(
        "# Made by `mentat-agent pricing import` from {comment}: {} models \
         (LiteLLM's per-token prices, exact), resource prices and discounts from \
         the base book {}.\n{}{models}",
        out.imported,
        base.version,
        head.to_toml()
    );
    out.book = PriceBook::parse(&out.text, "the imported book")?;
    Ok(out)
}

/// One entry's written prices, its long-context tiers and the cost keys not
/// read; `Err` says why the entry is skipped.
#[allow(clippy::type_complexity)]
fn entry(raw: &RawValue) -> Result<(Written, BTreeMap<u64, Written>, Vec<String>), String> {
    let fields: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(raw.get()).map_err(|_| "not a JSON object".to_string())?;
    let price = |key: &str| -> Result<Option<Decimal>, String> {
        let Some(v) = fields.get(key) else {
            return Ok(None);
        };
        let text = v.get().trim();
        let d = decimal_from_text(text)
            .filter(|d| !d.is_sign_negative() || d.is_zero())
            .ok_or_else(|| format!("{key} is not a non-negative number"))?;
        // Per token → per 1000 tokens: a shift of the scale, exact.
        d.checked_mul(Decimal::ONE_THOUSAND)
            .map(|d| Some(d.normalize()))
            .ok_or_else(|| format!("{key} is too large"))
    };
    if !fields.contains_key("input_cost_per_token") || !fields.contains_key("output_cost_per_token")
    {
        return Err(
            "no input_cost_per_token and output_cost_per_token (priced per image, second, \
             character or request)"
                .into(),
        );
    }
    let mut written: Written = [None; 11];
    for (key, i) in KEYS {
        written[i] = price(key)?;
    }
    let mut tiers: BTreeMap<u64, Written> = BTreeMap::new();
    let mut ignored = Vec::new();
    for key in fields.keys() {
        if KEYS.iter().any(|(k, _)| k == key) || !key.contains("cost") {
            continue;
        }
        let tier = TIERED.iter().find_map(|base| {
            let n = key
                .strip_prefix(base)?
                .strip_prefix("_above_")?
                .strip_suffix("k_tokens")?;
            let thousands: u64 = n
                .parse()
                .ok()
                .filter(|_| n.bytes().all(|b| b.is_ascii_digit()))?;
            Some((*base, thousands.checked_mul(1000)?))
        });
        match tier {
            Some((base, bound)) => {
                let i = KEYS.iter().find(|(k, _)| *k == base).map_or(0, |(_, i)| *i);
                tiers.entry(bound).or_insert([None; 11])[i] = price(key)?;
            }
            None => ignored.push(key.clone()),
        }
    }
    Ok((written, tiers, ignored))
}

/// `key = "decimal"` lines for the written prices.
fn write(s: &mut String, w: &Written) {
    for (k, v) in PRICE_KEYS.iter().zip(w) {
        if let Some(v) = v {
            s.push_str(&format!("{k} = {}\n", dec(*v)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;
    use crate::{pricing::DEFAULT_BOOK, report::record::TokenUsage};

    /// A trimmed real copy of LiteLLM's file (tests/fixtures/litellm/PROVENANCE.md).
    const REAL: &str = include_str!("../../../tests/fixtures/litellm/model_prices_trimmed.json");

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).expect("a decimal literal")
    }

    fn base() -> PriceBook {
        PriceBook::parse(DEFAULT_BOOK, "shipped").expect("valid")
    }

    fn real() -> Import {
        import(
            REAL,
            "model_prices_trimmed.json",
            &base(),
            Some("litellm-test"),
            "USD",
        )
        .expect("the real file imports")
    }

    fn price(i: &Import, model: &str) -> crate::pricing::ModelPrice {
        i.book.models().entries()[model].price.clone()
    }

    #[test]
    fn the_real_file_converts_exactly() {
        let i = real();
        // 11 entries: the sample and whisper-1 (per second) skipped, 9 imported.
        assert_eq!(i.imported, 9);
        assert_eq!(i.skipped.values().sum::<usize>(), 2, "{:?}", i.skipped);
        assert_eq!(i.book.version(), "litellm-test");
        // Resource prices and discounts are the base book's.
        assert_eq!(
            i.book.to_toml().lines().nth(2),
            base().to_toml().lines().nth(2)
        );

        // gpt-4o-mini: 1.5e-07, 6e-07, 7.5e-08 per token → × 1000.
        let m = price(&i, "gpt-4o-mini");
        assert_eq!(m.input_per_1k, dec("0.00015"));
        assert_eq!(m.output_per_1k, dec("0.0006"));
        assert_eq!(m.cache_read_input_per_1k, dec("0.000075"));
        // Not written: cache creation at the input price, reasoning at output's.
        assert_eq!(m.cache_creation_input_per_1k, dec("0.00015"));
        assert_eq!(m.reasoning_output_per_1k, dec("0.0006"));

        // bigmodel/glm-5.3's 1.1428571428571428e-06 through an f64 × 1000 would
        // be 0.0011428571428571427; read from its text it is exact.
        let g = price(&i, "bigmodel/glm-5.3");
        assert_eq!(g.input_per_1k.to_string(), "0.0011428571428571428");
        assert_eq!(
            g.cache_read_input_per_1k.to_string(),
            "0.0002857142857142857"
        );

        // Cache creation (claude-sonnet-4-5: 3.75e-06), reasoning (qwen-turbo:
        // 5e-07), audio and image (realtime: 3.2e-05, 5e-06, out 6.4e-05).
        assert_eq!(
            price(&i, "claude-sonnet-4-5").cache_creation_input_per_1k,
            dec("0.00375")
        );
        assert_eq!(
            price(&i, "dashscope/qwen-turbo").reasoning_output_per_1k,
            dec("0.0005")
        );
        let rt = price(&i, "azure/gpt-realtime-2.1-2026-07-07");
        assert_eq!(rt.audio_input_per_1k, Some(dec("0.032")));
        assert_eq!(rt.image_input_per_1k, Some(dec("0.005")));
        assert_eq!(rt.audio_output_per_1k, Some(dec("0.064")));
        assert_eq!(rt.text_input_per_1k, None);
        // An embedding model's explicit 0.0 output.
        assert_eq!(
            price(&i, "text-embedding-3-small").output_per_1k,
            Decimal::ZERO
        );

        // gemini-2.5-pro's *_above_200k_tokens: one tier above 200,000 input tokens.
        let gem = &i.book.models().entries()["gemini-2.5-pro"];
        assert_eq!(gem.long_context.len(), 1);
        let t = &gem.long_context[0];
        assert_eq!(t.above_input_tokens, 200_000);
        assert_eq!(t.price.input_per_1k, dec("0.0025"));
        assert_eq!(t.price.output_per_1k, dec("0.015"));
        assert_eq!(t.price.cache_read_input_per_1k, dec("0.00025"));
        assert_eq!(t.price.cache_creation_input_per_1k, dec("0.00025"));
        // _batches, _priority and per-query prices are not read, and are counted.
        assert!(i.ignored_keys.contains_key("input_cost_per_token_batches"));
        assert!(
            !i.ignored_keys
                .contains_key("input_cost_per_token_above_200k_tokens")
        );
    }

    #[test]
    fn calls_priced_with_the_imported_book() {
        let i = real();
        let cost = |t: TokenUsage| {
            let r = crate::report::record::UsageRecord {
                record_id: "r".into(),
                tokens: vec![t],
                ..Default::default()
            };
            i.book.price(&r, Decimal::ZERO).token
        };
        // The dated name is in the file itself: 3023 × 0.00015 + 1047 × 0.0006
        // = 1.08165 per 1k → 0.00108165.
        assert_eq!(
            cost(TokenUsage {
                model: "gpt-4o-mini-2024-07-18".into(),
                input: 3_023,
                output: 1_047,
                ..TokenUsage::default()
            }),
            dec("0.00108165")
        );
        // Above 200k: 50000 cached × 0.00025 + 200000 × 0.0025 + 2000 × 0.015
        // = 12.5 + 500 + 30 = 542.5 per 1k → 0.5425.
        assert_eq!(
            cost(TokenUsage {
                model: "gemini-2.5-pro".into(),
                input: 250_000,
                cache_read_input: 50_000,
                output: 2_000,
                ..TokenUsage::default()
            }),
            dec("0.5425")
        );
    }

    #[test]
    fn the_default_version_follows_the_file() {
        let a = import(REAL, "f", &base(), None, "USD").expect("imports");
        let b = import(REAL, "f", &base(), None, "USD").expect("imports");
        assert_eq!(a.book.version(), b.book.version());
        assert!(a.book.version().starts_with("litellm-"));
        let changed = REAL.replacen("1.5e-07", "1.6e-07", 1);
        let c = import(&changed, "f", &base(), None, "USD").expect("imports");
        assert_ne!(a.book.version(), c.book.version());
    }

    #[test]
    fn bad_input_is_refused_or_skipped_and_counted() {
        let e = import("[1, 2]", "f.json", &base(), None, "USD").expect_err("not a map");
        assert!(e.to_string().starts_with("f.json: not a LiteLLM"), "{e}");
        let e = import("{}", "f.json", &base(), None, "USD").expect_err("empty");
        assert!(e.to_string().contains("lists no models"), "{e}");
        let e = import(REAL, "f", &base(), None, "EUR").expect_err("currency");
        assert!(e.to_string().contains("base book is in USD"), "{e}");
        let i = import(
            r#"{"ok": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
                "neg": {"input_cost_per_token": -1e-06, "output_cost_per_token": 2e-06},
                "text": {"input_cost_per_token": "0.1", "output_cost_per_token": 2e-06},
                "null": {"input_cost_per_token": null, "output_cost_per_token": 2e-06},
                "weird \"name\"\n": {"input_cost_per_token": 0, "output_cost_per_token": 0}}"#,
            "f",
            &base(),
            Some("v"),
            "USD",
        )
        .expect("imports what it can");
        assert_eq!(i.imported, 2);
        assert_eq!(
            i.skipped
                .get("input_cost_per_token is not a non-negative number"),
            Some(&3)
        );
        assert!(i.book.has_model("weird \"name\"\n"));
    }
}
