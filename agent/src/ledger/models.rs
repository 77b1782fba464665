//! The `model` dimension of usage queries: a record's sums split by the
//! models of its token usages, exactly.
//!
//! In: a record's exact sums (an [`Acc`] of one row) and its stored token
//! usages. Out: one part per model whose parts add up to the record exactly.
//!
//! The rule (README, "Tokens"): a record belongs to the model of its first
//! token usage (`unattributed`, no model, when it has none: CPU, network,
//! storage and bucket records; an empty model name is no model), and carries
//! its record count and all its other quantities there. Each further usage
//! (a record the agent writes carries one span's tokens, so one model; the
//! stored form allows several) is moved to its own model's part: its token
//! counts, its token cost, and the share of the record's discount its cost
//! is of the subtotal. The first part is the record minus those, by exact
//! subtraction, so the parts always sum to the record to the last digit.
//!
//! Hourly rollups keep the model parts in `hourly_models` (the first model's
//! part included); the record's `unattributed` part of an hour is the
//! `hourly` row minus its model rows. Hours compacted before the table
//! existed have no model rows, so their tokens group as `unattributed`.

use std::path::Path;

use rust_decimal::Decimal;
use serde::Serialize;

use super::{LedgerError, corrupt, exact::Exact, overflow, sum::Acc};
use crate::report::record::TokenUsage;

/// The group-by and filter name of the model dimension.
pub const MODEL: &str = "model";

/// The longest model name a filter may carry.
pub const MAX_MODEL_LEN: usize = 256;

/// Whether `name` can be a model name in a filter: 1 to [`MAX_MODEL_LEN`]
/// bytes of ASCII letters, digits and `. _ - : / @ +` (what providers'
/// model ids and the price book's keys use).
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MODEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/@+".contains(&b))
}

/// Token counts of the types the records table has no column for (the
/// parts of input and output), summed per model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TokenTypes {
    /// Σ input tokens written to the provider's prompt cache.
    pub cache_creation_input: u64,
    /// Σ text input tokens.
    pub text_input: u64,
    /// Σ image input tokens.
    pub image_input: u64,
    /// Σ audio input tokens.
    pub audio_input: u64,
    /// Σ video input tokens.
    pub video_input: u64,
    /// Σ text output tokens.
    pub text_output: u64,
    /// Σ audio output tokens.
    pub audio_output: u64,
}

/// Column names of [`TokenTypes`] in `hourly_models`, in [`TokenTypes::to_array`] order.
pub(super) const TYPE_COLS: [&str; 7] = [
    "tokens_cache_creation_input",
    "tokens_text_input",
    "tokens_image_input",
    "tokens_audio_input",
    "tokens_video_input",
    "tokens_text_output",
    "tokens_audio_output",
];

/// `of`, `to_array` and `from_array` of [`TokenTypes`] from its field list,
/// written once (in [`TYPE_COLS`] order).
macro_rules! token_type_conversions {
    ($($field:ident),*) => {
        fn of(t: &TokenUsage) -> Self {
            Self { $($field: t.$field),* }
        }

        pub(super) fn to_array(self) -> [u64; TYPE_COLS.len()] {
            [$(self.$field),*]
        }

        pub(super) fn from_array(a: [u64; TYPE_COLS.len()]) -> Self {
            let [$($field),*] = a;
            Self { $($field),* }
        }
    };
}

impl TokenTypes {
    token_type_conversions!(
        cache_creation_input,
        text_input,
        image_input,
        audio_input,
        video_input,
        text_output,
        audio_output
    );

    /// `self + o`, or an overflow error.
    pub(super) fn checked_add(self, o: TokenTypes) -> Result<TokenTypes, LedgerError> {
        let (a, b) = (self.to_array(), o.to_array());
        let mut out = [0u64; 7];
        for (k, v) in out.iter_mut().enumerate() {
            *v = a[k]
                .checked_add(b[k])
                .ok_or_else(|| overflow(TYPE_COLS[k]))?;
        }
        Ok(Self::from_array(out))
    }

    pub(super) fn is_zero(self) -> bool {
        self.to_array().iter().all(|&v| v == 0)
    }
}

/// One model's part of a record (None: no model).
#[derive(Debug)]
pub(super) struct Part {
    pub(super) model: Option<String>,
    pub(super) acc: Acc,
    pub(super) types: TokenTypes,
}

/// Positions in `Acc::dec` and `Acc::ints` (DEC_COLS, INT_COLS).
const COST_TOKEN: usize = 10;
const COST_SUBTOTAL: usize = 11;
const COST_DISCOUNT: usize = 12;
const COST_TOTAL: usize = 13;
const TOKENS_INPUT: usize = 6;

/// The model a usage names; an empty name is none.
fn model_of(t: &TokenUsage) -> Option<String> {
    Some(t.model.clone()).filter(|m| !m.is_empty())
}

/// Splits one record, whose exact sums are `whole` and whose stored token
/// usages are the JSON `tokens` (NULL: none), into its model parts.
pub(super) fn split(
    whole: Acc,
    tokens: Option<&str>,
    path: &Path,
) -> Result<Vec<Part>, LedgerError> {
    let usages: Vec<TokenUsage> = match tokens {
        None => Vec::new(),
        Some(s) => serde_json::from_str(s)
            .map_err(|e| corrupt(path, format!("a record's tokens do not decode: {e}")))?,
    };
    let Some((first, rest)) = usages.split_first() else {
        return Ok(vec![Part {
            model: None,
            acc: whole,
            types: TokenTypes::default(),
        }]);
    };
    let subtotal = whole.dec[COST_SUBTOTAL].to_decimal().unwrap_or_default();
    let discount = whole.dec[COST_DISCOUNT].to_decimal().unwrap_or_default();
    let mut parts = Vec::with_capacity(usages.len());
    let mut head = whole;
    for t in rest {
        let cost = t.cost.unwrap_or_default();
        // The usage's share of the record's discount; rounding here (at 28
        // digits) moves nothing: the first part takes what the others leave.
        let share = if subtotal.is_zero() {
            Decimal::ZERO
        } else {
            discount
                .checked_mul(cost)
                .and_then(|d| d.checked_div(subtotal))
                .unwrap_or_default()
        };
        let mut acc = Acc::default();
        acc.dec[COST_TOKEN] = Exact::from_decimal(cost);
        acc.dec[COST_SUBTOTAL] = Exact::from_decimal(cost);
        acc.dec[COST_DISCOUNT] = Exact::from_decimal(share);
        acc.dec[COST_TOTAL] = Exact::from_decimal(cost)
            .checked_sub(Exact::from_decimal(share))
            .ok_or_else(|| overflow("cost_total"))?;
        for (k, v) in [t.input, t.cache_read_input, t.output, t.reasoning_output]
            .into_iter()
            .enumerate()
        {
            acc.ints[TOKENS_INPUT + k] = v;
        }
        head.sub(&acc)?;
        parts.push(Part {
            model: model_of(t),
            acc,
            types: TokenTypes::of(t),
        });
    }
    parts.insert(
        0,
        Part {
            model: model_of(first),
            acc: head,
            types: TokenTypes::of(first),
        },
    );
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        s.parse().expect("decimal")
    }

    #[test]
    fn model_names_are_checked() {
        assert!(valid_model_name("gpt-4o-mini-2024-07-18"));
        assert!(valid_model_name("anthropic/claude-3.5-sonnet@20240620"));
        assert!(!valid_model_name(""));
        assert!(!valid_model_name("gpt 4o"));
        assert!(!valid_model_name("x'; DROP TABLE records; --"));
        assert!(!valid_model_name(&"a".repeat(MAX_MODEL_LEN + 1)));
        assert!(valid_model_name(&"a".repeat(MAX_MODEL_LEN)));
    }

    /// A record with two models splits into two parts that sum to it
    /// exactly, money and counts, and the second model's part is its own.
    #[test]
    fn a_record_of_two_models_splits_exactly() {
        let mut whole = Acc {
            records: 1,
            priced: 1,
            ..Acc::default()
        };
        // cpu 0.1, token 0.3 + 0.0000001 (two usages), discount 10 %.
        let cpu = dec("0.1");
        let (c1, c2) = (dec("0.3"), dec("0.0000001"));
        let subtotal = cpu + c1 + c2;
        let discount = subtotal / dec("10");
        whole.dec[5] = Exact::from_decimal(cpu);
        whole.dec[COST_TOKEN] = Exact::from_decimal(c1 + c2);
        whole.dec[COST_SUBTOTAL] = Exact::from_decimal(subtotal);
        whole.dec[COST_DISCOUNT] = Exact::from_decimal(discount);
        whole.dec[COST_TOTAL] = Exact::from_decimal(subtotal - discount);
        whole.ints[TOKENS_INPUT] = 30;
        whole.ints[TOKENS_INPUT + 2] = 7;
        let usages = vec![
            TokenUsage {
                model: "a".into(),
                input: 20,
                output: 5,
                audio_input: 3,
                cost: Some(c1),
                ..TokenUsage::default()
            },
            TokenUsage {
                model: "b".into(),
                input: 10,
                output: 2,
                image_input: 4,
                cost: Some(c2),
                ..TokenUsage::default()
            },
        ];
        let json = serde_json::to_string(&usages).expect("json");
        let parts = split(whole.clone(), Some(&json), Path::new("t")).expect("split");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].model.as_deref(), Some("a"));
        assert_eq!(parts[1].model.as_deref(), Some("b"));
        assert_eq!((parts[0].acc.records, parts[1].acc.records), (1, 0));
        assert_eq!(parts[1].acc.ints[TOKENS_INPUT], 10);
        assert_eq!(parts[0].acc.ints[TOKENS_INPUT], 20);
        assert_eq!(parts[1].acc.dec[COST_TOKEN].to_decimal(), Some(c2));
        assert_eq!(parts[0].acc.dec[COST_TOKEN].to_decimal(), Some(c1));
        assert_eq!(parts[1].types.image_input, 4);
        assert_eq!(parts[0].types.audio_input, 3);
        // The CPU stays with the record's first model.
        assert_eq!(parts[0].acc.dec[5].to_decimal(), Some(cpu));
        assert!(
            parts[1].acc.dec[5]
                .to_decimal()
                .is_some_and(|d| d.is_zero())
        );
        let mut sum = Acc::default();
        for p in &parts {
            sum.merge(&p.acc).expect("sum");
        }
        assert_eq!(sum.dec, whole.dec, "the parts add up to the record exactly");
        assert_eq!(sum.ints, whole.ints);
        assert_eq!(sum.records, whole.records);
    }

    #[test]
    fn a_record_without_tokens_has_no_model() {
        let whole = Acc {
            records: 1,
            ..Acc::default()
        };
        let parts = split(whole, None, Path::new("t")).expect("split");
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].model, None);
        let unnamed =
            r#"[{"model":"","input":1,"cache_read_input":0,"output":1,"reasoning_output":0}]"#;
        let parts = split(Acc::default(), Some(unnamed), Path::new("t")).expect("split");
        assert_eq!(parts[0].model, None);
        assert!(split(Acc::default(), Some("not json"), Path::new("t")).is_err());
    }
}
