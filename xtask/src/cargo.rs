//! Cargo helpers: where the workspace and its build outputs are, and what test runs report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cmd;

/// The workspace root, which is where xtask's own manifest directory sits.
pub fn workspace_root() -> &'static Path {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir)
}

/// A `cargo` command run from the workspace root.
///
/// It goes through the rustup proxy on PATH, not `$CARGO` (the toolchain's own binary),
/// because only the proxy understands `+nightly`.
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(workspace_root());
    cmd
}

/// Runs a cargo command as a step of its own, with the time it took at the end.
pub fn run_step(what: &str, mut cmd: Command) -> Result<()> {
    let start = Instant::now();
    say!("{what}");
    cmd::run(&mut cmd)?;
    say!("{what}: done in {}", cmd::elapsed(start));
    Ok(())
}

/// The target directory, asked of cargo since a config file or CARGO_TARGET_DIR can move it.
pub fn target_dir() -> Result<PathBuf> {
    let json = cmd::output(&mut cargo([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
    ]))?;
    json_string_field(&json, "target_directory")
        .map(PathBuf::from)
        .context("`cargo metadata` did not report a target_directory")
}

/// The binaries of the release profile, by name.
pub fn release_bin(target_dir: &Path, name: &str) -> PathBuf {
    target_dir.join("release").join(name)
}

// Just enough JSON for one string field, so xtask needs no JSON library.
fn json_string_field(json: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\":");
    let rest = json[json.find(&key)? + key.len()..].trim_start();
    let mut chars = rest.strip_prefix('"')?.chars();
    let mut value = String::new();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// Passed and failed tests, summed over the `test result:` lines cargo test prints.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestTally {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
}

impl TestTally {
    /// Adds the counts of a `test result: ok. 3 passed; 0 failed; ...` line; other lines
    /// are ignored.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(count), Some(what), None) = (words.next(), words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_sums_ok_and_failed_result_lines() {
        let mut tally = TestTally::default();
        for line in [
            "running 3 tests",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n",
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 5 filtered out; finished in 12.50s",
            "test foo ... ok",
        ] {
            tally.add_line(line);
        }
        assert_eq!(
            tally,
            TestTally {
                passed: 4,
                failed: 2
            }
        );
    }

    #[test]
    fn json_field_is_found_and_unescaped() {
        let json = r#"{"packages":[],"target_directory":"/a \"b\"\\c","version":1}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some(r#"/a "b"\c"#)
        );
        assert_eq!(json_string_field(json, "workspace_root"), None);
    }
}
