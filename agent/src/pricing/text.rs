//! A price book written back as TOML: a validated [`PriceBook`] in, the text
//! of a book that parses to the same book out (every price a quoted decimal
//! string, so nothing passes through a float).
//!
//! Every price is written resolved (defaults spelt out, long-context tiers
//! complete), so the text needs no knowledge of the defaults to read.

use std::fmt::Write as _;

use rust_decimal::Decimal;

use super::{ModelPrice, NetworkPrice, PriceBook, models::PRICE_KEYS};

impl PriceBook {
    /// The book as TOML text that [`PriceBook::parse`] reads back to an equal book.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "version = {}", quote(&self.version));
        let _ = writeln!(s, "currency = {}", quote(&self.currency));
        for (k, v) in [
            ("cpu_per_core_hour", self.cpu_per_core_hour),
            ("memory_per_gb_hour", self.memory_per_gb_hour),
            ("gpu_per_hour", self.gpu_per_hour),
            ("storage_per_gb_month", self.storage_per_gb_month),
        ] {
            let _ = writeln!(s, "{k} = {}", dec(v));
        }
        s.push_str("\n[network]\n");
        match self.network {
            NetworkPrice::PerGb(p) => {
                let _ = writeln!(s, "per_gb = {}", dec(p));
            }
            NetworkPrice::Split {
                rx_per_gb,
                tx_per_gb,
            } => {
                let _ = writeln!(s, "rx_per_gb = {}", dec(rx_per_gb));
                let _ = writeln!(s, "tx_per_gb = {}", dec(tx_per_gb));
            }
        }
        for t in &self.tiers {
            s.push_str("\n[[discounts]]\n");
            let _ = writeln!(s, "from = {}", dec(t.from));
            if let Some(to) = t.to {
                let _ = writeln!(s, "to = {}", dec(to));
            }
            let _ = writeln!(s, "percent = {}", dec(t.percent));
        }
        for (name, e) in self.models.entries() {
            let _ = writeln!(s, "\n[models.{}]", quote(name));
            prices(&mut s, &e.price);
            if !e.aliases.is_empty() {
                let list: Vec<String> = e.aliases.iter().map(|a| quote(a)).collect();
                let _ = writeln!(s, "aliases = [{}]", list.join(", "));
            }
            for t in &e.long_context {
                let _ = writeln!(s, "[[models.{}.long_context]]", quote(name));
                let _ = writeln!(s, "above_input_tokens = {}", t.above_input_tokens);
                prices(&mut s, &t.price);
            }
        }
        s
    }
}

/// A model's (or tier's) prices, one `key = "decimal"` line each, in [`PRICE_KEYS`] order.
pub(super) fn prices(s: &mut String, m: &ModelPrice) {
    let values = [
        Some(m.input_per_1k),
        Some(m.output_per_1k),
        Some(m.cache_read_input_per_1k),
        Some(m.cache_creation_input_per_1k),
        Some(m.reasoning_output_per_1k),
        m.text_input_per_1k,
        m.image_input_per_1k,
        m.audio_input_per_1k,
        m.video_input_per_1k,
        m.text_output_per_1k,
        m.audio_output_per_1k,
    ];
    for (k, v) in PRICE_KEYS.iter().zip(values) {
        if let Some(v) = v {
            let _ = writeln!(s, "{k} = {}", dec(v));
        }
    }
}

/// A decimal as a quoted TOML string, without trailing zeros.
pub(super) fn dec(d: Decimal) -> String {
    quote(&d.normalize().to_string())
}

/// `s` as a TOML basic string (model names are free text: `azure/gpt-4o`, quotes, control characters).
pub(super) fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}
