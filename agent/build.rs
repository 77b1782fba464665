//! Builds the eBPF programs (agent-ebpf) for the BPF target and leaves the
//! object in OUT_DIR, where `probes` embeds it: a plain `cargo build` yields
//! a complete agent binary.

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
