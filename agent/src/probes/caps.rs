//! The capabilities the agent needs, read from the kernel's view of this process.

use std::fs;

/// A Linux capability the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Its name, e.g. `CAP_BPF`.
    pub name: &'static str,
    /// Its number in `linux/capability.h`.
    pub bit: u32,
    /// What the agent needs it for.
    pub why: &'static str,
}

/// Defines each capability as a constant named as the kernel names it (the
/// name is written once: the constant's, stringified).
macro_rules! caps {
    ($($(#[$doc:meta])* $id:ident = ($bit:literal, $why:literal);)*) => {
        $($(#[$doc])* pub const $id: Cap = Cap {
            name: stringify!($id),
            bit: $bit,
            why: $why,
        };)*
    };
}

caps! {
    /// Loading BPF programs and maps (Linux ≥ 5.8).
    CAP_BPF = (39, "load eBPF programs and maps");
    /// Attaching to tracepoints and perf events (Linux ≥ 5.8).
    CAP_PERFMON = (38, "attach tracing programs and the per-CPU timer");
    /// Covers both of the above on any kernel.
    CAP_SYS_ADMIN = (21, "stands in for CAP_BPF and CAP_PERFMON");
    /// Reading other users' /proc/<pid>/exe.
    CAP_SYS_PTRACE = (19, "read other processes' executable paths in /proc");
    /// Reading /proc and cgroup files owned by other users.
    CAP_DAC_READ_SEARCH = (2, "read other users' /proc and cgroup files");
    /// Lifting RLIMIT_MEMLOCK for BPF maps on kernels before 5.11.
    CAP_SYS_RESOURCE = (24, "lift the locked-memory limit for maps on kernels before 5.11");
}

/// The effective capability set of this process (`CapEff` in /proc/self/status).
pub fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .unwrap_or(0)
}

/// Parses the `CapEff:` line of a status file.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Whether `set` holds `cap`.
pub fn has(set: u64, cap: Cap) -> bool {
    set & (1u64 << cap.bit) != 0
}

/// The capabilities missing for loading and attaching the probes, by name.
pub fn missing_for_probes(set: u64) -> Vec<Cap> {
    if has(set, CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [CAP_BPF, CAP_PERFMON]
        .into_iter()
        .filter(|&c| !has(set, c))
        .collect()
}

/// The capabilities without which the agent runs but sees less of other users'
/// processes (executable paths, run context, disk I/O).
pub fn missing_for_other_users(set: u64) -> Vec<Cap> {
    [CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH]
        .into_iter()
        .filter(|&c| !has(set, c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let s = "Name:\tx\nCapInh:\t0\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(s), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff(""), None);
    }

    #[test]
    fn sys_admin_covers_bpf_and_perfmon() {
        assert_eq!(
            (CAP_SYS_ADMIN.name, CAP_SYS_ADMIN.bit),
            ("CAP_SYS_ADMIN", 21)
        );
        assert!(missing_for_probes(1 << CAP_SYS_ADMIN.bit).is_empty());
        assert_eq!(missing_for_probes(1 << CAP_BPF.bit), vec![CAP_PERFMON]);
        assert_eq!(missing_for_probes(0), vec![CAP_BPF, CAP_PERFMON]);
    }
}
