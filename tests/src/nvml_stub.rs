//! The stand-in NVML of `tests/nvml-stub/nvml_stub.c`, built into a temporary
//! directory of its own with its script beside it (see the C file for the script
//! format). Each copy reads only its own script, so tests in parallel never share one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use tempfile::TempDir;

/// One built copy of the stub and its script.
#[derive(Debug)]
pub struct NvmlStub {
    dir: TempDir,
}

impl NvmlStub {
    /// Compiles the stub (`$CC`, else `cc`, `-shared -fPIC`) and writes `script`
    /// beside it; the tick file says tick 0.
    pub fn build(script: &str) -> Result<NvmlStub> {
        let dir = tempfile::Builder::new()
            .prefix("mentat-nvml-stub-")
            .tempdir()
            .context("creating a temporary directory for the NVML stub")?;
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("nvml-stub/nvml_stub.c");
        let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let library = dir.path().join("libnvidia-ml.so.1");
        let status = Command::new(&compiler)
            .args(["-shared", "-fPIC", "-o"])
            .arg(&library)
            .arg(&source)
            .status()
            .with_context(|| format!("running {compiler} on {}", source.display()))?;
        ensure!(
            status.success(),
            "{compiler} failed on {} ({status})",
            source.display()
        );
        let stub = NvmlStub { dir };
        std::fs::write(stub.script(), script)
            .with_context(|| format!("writing {}", stub.script().display()))?;
        stub.set_tick(0)?;
        Ok(stub)
    }

    /// The directory holding the library (`LD_LIBRARY_PATH` for a process that
    /// loads the system's `libnvidia-ml.so.1`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The library, for `[gpu] library_path`.
    pub fn library(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// The script the library reads (beside it).
    pub fn script(&self) -> PathBuf {
        self.dir.path().join("nvml-stub.script")
    }

    /// Sets the tick the stub answers for (without a `clock` line in the script).
    pub fn set_tick(&self, tick: u32) -> Result<()> {
        let path = self.dir.path().join("nvml-stub.script.tick");
        std::fs::write(&path, tick.to_string())
            .with_context(|| format!("writing {}", path.display()))
    }
}
