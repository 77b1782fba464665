//! `kernel.bpf_stats_enabled`, switched on only for the rounds that read the kernel's own
//! per-program run time, and restored to the value found when the guard is dropped.

use std::fs;

use anyhow::{Context, Result};

use crate::BPF_STATS_SYSCTL;

/// Switches `kernel.bpf_stats_enabled`, restoring the value it found when dropped.
pub(crate) struct BpfStats {
    pub(crate) old: String,
}

impl BpfStats {
    pub(crate) fn take() -> Result<Self> {
        let old = fs::read_to_string(BPF_STATS_SYSCTL).with_context(|| {
            format!("reading {BPF_STATS_SYSCTL} (BPF run statistics need Linux ≥ 5.1)")
        })?;
        Ok(Self {
            old: old.trim().to_owned(),
        })
    }

    pub(crate) fn set(&self, on: bool) -> Result<()> {
        fs::write(BPF_STATS_SYSCTL, if on { "1" } else { "0" })
            .with_context(|| format!("writing {BPF_STATS_SYSCTL}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS_SYSCTL, &self.old) {
            eprintln!(
                "bench: WARNING: could not restore {BPF_STATS_SYSCTL} to {}: {e}",
                self.old
            );
        }
    }
}
