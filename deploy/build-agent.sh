#!/bin/sh
# The container image's build stage, as a script so it runs the same inside and
# outside Docker (deploy/Dockerfile runs it; so can you, from the repository root):
#
#   sh deploy/build-agent.sh            # → target/release/mentat-agent
#
# It follows ../shared/TOOLCHAIN.md: stable Rust builds userspace, the nightly named by
# RUST_NIGHTLY (with rust-src) builds the eBPF programs through aya-build, and
# bpf-linker 0.13.0 is built against that nightly's own libLLVM. Steps already done
# (rust-src present, bpf-linker of the right version on PATH) are skipped.
set -eu

RUST_NIGHTLY="${RUST_NIGHTLY:-nightly}"
BPF_LINKER_VERSION="${BPF_LINKER_VERSION:-0.13.0}"
# Where the libLLVM links live; bpf-linker's runpath points here, so it must stay.
LLVM_PREFIX_DIR="${LLVM_PREFIX_DIR:-${HOME:-/root}/.local/share/mentat-agent/llvm}"

say() { echo "build-agent: $*" >&2; }

rustup toolchain list | grep -q "^${RUST_NIGHTLY}" || rustup toolchain install "$RUST_NIGHTLY" --profile minimal
rustup component add rust-src --toolchain "$RUST_NIGHTLY"

SR="$(rustc "+$RUST_NIGHTLY" --print sysroot)"
LLVM_MAJOR="$(rustc "+$RUST_NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
if bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    say "bpf-linker $BPF_LINKER_VERSION present"
else
    say "building bpf-linker $BPF_LINKER_VERSION against $RUST_NIGHTLY's LLVM $LLVM_MAJOR"
    mkdir -p "$LLVM_PREFIX_DIR/lib"
    for lib in "$SR"/lib/libLLVM.so."$LLVM_MAJOR".*-rust-*; do
        ln -sf "$lib" "$LLVM_PREFIX_DIR/lib/libLLVM.so"   # for the link
        ln -sf "$lib" "$LLVM_PREFIX_DIR/lib/"             # its soname, for the runpath
    done
    LLVM_PREFIX="$LLVM_PREFIX_DIR" cargo "+$RUST_NIGHTLY" install bpf-linker \
        --version "$BPF_LINKER_VERSION" --locked --no-default-features --features "llvm-$LLVM_MAJOR"
fi

say "building mentat-agent (release)"
CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback \
    cargo build --release --locked -p mentat-agent
# CARGO_TARGET_DIR moves the output (the tests build with one of their own).
ls -l "${CARGO_TARGET_DIR:-target}/release/mentat-agent" >&2
