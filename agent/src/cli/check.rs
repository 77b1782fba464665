//! `mentat-agent check`: what the agent needs from the kernel and whether it is here.

use std::{fs, path::Path};

use crate::{
    identity::process::find_cgroup2_mount,
    probes::{BTF_TRACEPOINTS, NET_TRACEPOINTS, ProbeConfig, Probes, TRACEPOINTS, btf, caps},
};

/// One requirement's verdict.
#[derive(Clone, Debug)]
pub struct Item {
    /// What is checked.
    pub what: String,
    /// Whether it is met.
    pub ok: bool,
    /// Whether the agent cannot run without it.
    pub required: bool,
    /// What was found, or what to do about it.
    pub detail: String,
}

fn item(what: impl Into<String>, ok: bool, required: bool, detail: impl Into<String>) -> Item {
    Item {
        what: what.into(),
        ok,
        required,
        detail: detail.into(),
    }
}

/// Runs every check. Loading the probes is the last one, and only when the
/// capabilities for it are present: it is the real test of the tracepoints.
pub fn run(probe_config: &ProbeConfig) -> Vec<Item> {
    let mut items = Vec::new();

    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let version_ok = kernel_at_least(&release, 5, 8);
    items.push(item(
        "kernel ≥ 5.8",
        version_ok,
        true,
        if release.is_empty() {
            "unknown".to_string()
        } else {
            release
        },
    ));

    let btf_path = Path::new(&probe_config.btf_path);
    let btf_result = btf::Btf::from_file(btf_path).and_then(|b| btf::task_offsets(&b));
    items.push(item(
        format!("kernel BTF ({})", btf_path.display()),
        btf_result.is_ok(),
        true,
        match &btf_result {
            Ok(o) => format!(
                "task_struct offsets resolved (start_boottime at {}, group_leader at {})",
                o.task_start_boottime, o.task_group_leader
            ),
            Err(e) => format!("{e}; the kernel needs CONFIG_DEBUG_INFO_BTF=y"),
        },
    ));

    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cg2 = find_cgroup2_mount(&mountinfo);
    items.push(item(
        "cgroup v2 mount",
        cg2.is_some(),
        true,
        match &cg2 {
            Some(p) => format!("at {}", p.display()),
            None => {
                "none found in /proc/self/mountinfo: mount -t cgroup2 none /sys/fs/cgroup".into()
            }
        },
    ));

    let bpffs = mountinfo.lines().any(|l| {
        l.split_once(" - ")
            .is_some_and(|(_, post)| post.starts_with("bpf "))
    });
    items.push(item(
        "bpffs",
        bpffs,
        false,
        if bpffs {
            "mounted".to_string()
        } else {
            "not mounted (not needed yet; for pinned maps: mount -t bpf bpf /sys/fs/bpf)"
                .to_string()
        },
    ));

    let eff = caps::effective();
    let missing = caps::missing_for_probes(eff);
    for cap in [caps::CAP_BPF, caps::CAP_PERFMON] {
        let ok = !missing.contains(&cap);
        items.push(item(
            cap.name,
            ok,
            true,
            if caps::has(eff, cap) {
                format!("present: {}", cap.why)
            } else if ok {
                "covered by CAP_SYS_ADMIN".to_string()
            } else {
                format!("MISSING: needed to {}", cap.why)
            },
        ));
    }
    for cap in [
        caps::CAP_SYS_PTRACE,
        caps::CAP_DAC_READ_SEARCH,
        caps::CAP_SYS_RESOURCE,
    ] {
        let ok = caps::has(eff, cap);
        items.push(item(
            cap.name,
            ok,
            false,
            if ok {
                format!("present: {}", cap.why)
            } else {
                format!("missing: cannot {}", cap.why)
            },
        ));
    }

    items.push(match crate::collect::gpu::GpuMeter::open(&crate::collect::gpu::GpuConfig::default()) {
        Ok(g) => {
            let mig = g.devices().iter().filter(|d| d.mig_enabled).count();
            item(
                "GPU metering (NVML)",
                true,
                false,
                format!(
                    "{} device(s){}",
                    g.devices().len(),
                    if mig > 0 {
                        format!("; {mig} with MIG: per-instance memory only, GPU time per device (NVML has no per-process time under MIG)")
                    } else {
                        String::new()
                    }
                ),
            )
        }
        Err(e) => item("GPU metering (NVML)", false, false, format!("off: {e}")),
    });

    let hooks: Vec<&str> = BTF_TRACEPOINTS
        .iter()
        .chain(TRACEPOINTS)
        .map(|(_, h)| *h)
        .collect();
    let what = format!(
        "probes load and attach ({} + perf cpu-clock)",
        hooks.join(", ")
    );
    if !missing.is_empty() {
        items.push(item(what, false, true, "not tried: capabilities missing"));
    } else {
        match Probes::load(probe_config) {
            Ok(p) => {
                items.push(item(what, true, true, "loaded, attached and detached"));
                let net: Vec<&str> = NET_TRACEPOINTS.iter().map(|(_, h)| *h).collect();
                let net_what = format!("network metering ({})", net.join(", "));
                items.push(match p.network() {
                    Ok(()) => item(net_what, true, false, "attached"),
                    Err(e) => item(
                        net_what,
                        false,
                        false,
                        format!("unavailable (needs Linux ≥ 6.3): {e}"),
                    ),
                });
                items.push(if p.sender_binding() {
                    item(
                        "span sender binding",
                        true,
                        false,
                        "the kernel names each OTLP client's process: spans bind their sender's usage only",
                    )
                } else {
                    item(
                        "span sender binding",
                        false,
                        false,
                        "unavailable (needs Linux ≥ 6.3 and struct sock in BTF): spans are refused from every sender but [receiver] trusted_forwarders",
                    )
                });
            }
            Err(e) => items.push(item(what, false, true, e.to_string())),
        }
    }
    items
}

/// Whether a kernel release string ("6.18.44-foo") is at least `major.minor`.
pub fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (Some(ma), Some(mi)) = (parts.next(), parts.next()) else {
        return false;
    };
    (ma, mi) >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_compare() {
        assert!(kernel_at_least("6.18.44-fc-v669", 5, 8));
        assert!(kernel_at_least("5.8.0", 5, 8));
        assert!(!kernel_at_least("5.4.0-150-generic", 5, 8));
        assert!(!kernel_at_least("", 5, 8));
        assert!(!kernel_at_least("garbage", 5, 8));
    }
}
