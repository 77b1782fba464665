//! `mentat-agent pricing import FILE`: a LiteLLM price file in, a versioned
//! price book on stdout, a summary (models, skipped entries by reason, cost
//! keys not read) on stderr.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use crate::pricing::{
    DEFAULT_BOOK, PriceBook, PricingError,
    litellm::{self, ImportError},
};

/// Why `pricing import` failed.
#[derive(Debug, thiserror::Error)]
pub enum PricingCmdError {
    /// The LiteLLM file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The base book is invalid.
    #[error(transparent)]
    Base(#[from] PricingError),
    /// The conversion failed.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// Writing the book failed.
    #[error("writing the book: {0}")]
    Output(#[from] io::Error),
}

/// Converts `file`; the resource prices and discounts come from `base` (default: the built-in book).
pub fn import(
    file: &Path,
    base: Option<&Path>,
    version: Option<&str>,
    currency: &str,
    out: &mut dyn Write,
    summary: &mut dyn Write,
) -> Result<(), PricingCmdError> {
    let json = std::fs::read_to_string(file).map_err(|source| PricingCmdError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let base = match base {
        Some(p) => PriceBook::load(p)?,
        None => PriceBook::parse(DEFAULT_BOOK, "built-in deploy/pricing.toml")?,
    };
    let origin = file.display().to_string();
    let i = litellm::import(&json, &origin, &base, version, currency)?;
    out.write_all(i.text.as_bytes())?;
    out.flush()?;
    // The summary is advice; a closed stderr must not fail the import.
    let _ = writeln!(
        summary,
        "mentat-agent: {} models imported into book version {} ({})",
        i.imported,
        i.book.version(),
        i.book.currency()
    );
    for (reason, n) in &i.skipped {
        let _ = writeln!(summary, "  skipped {n} entries: {reason}");
    }
    if !i.ignored_keys.is_empty() {
        let keys: Vec<String> = i
            .ignored_keys
            .iter()
            .map(|(k, n)| format!("{k} ({n})"))
            .collect();
        let _ = writeln!(
            summary,
            "  cost keys not read (not per-token prices of a standard call): {}",
            keys.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_prints_a_book_the_agent_loads() {
        let file = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/litellm/model_prices_trimmed.json"
        ));
        let (mut out, mut summary) = (Vec::new(), Vec::new());
        import(
            file,
            None,
            Some("2026-12-01-litellm"),
            "USD",
            &mut out,
            &mut summary,
        )
        .expect("imports");
        let text = String::from_utf8(out).expect("utf-8");
        let book = PriceBook::parse(&text, "stdout").expect("a valid book");
        assert_eq!(book.version(), "2026-12-01-litellm");
        assert!(book.has_model("gpt-4o-mini"));
        let summary = String::from_utf8(summary).expect("utf-8");
        assert!(summary.contains("9 models imported"), "{summary}");
        assert!(
            summary.contains("skipped 1 entries: no input_cost_per_token"),
            "{summary}"
        );

        let missing = import(
            Path::new("/nonexistent/prices.json"),
            None,
            None,
            "USD",
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .expect_err("no file");
        assert!(
            missing
                .to_string()
                .starts_with("/nonexistent/prices.json: cannot read")
        );
    }
}
