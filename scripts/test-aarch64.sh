#!/usr/bin/env bash
# The library's unit tests (the GEMM's NEON micro-kernel among them) built for 64-bit ARM and
# run under qemu-user on an x86-64 Debian machine, as root:
#     scripts/test-aarch64.sh [TEST FILTER]
# Needs rustup's aarch64 standard library (fetched from static.rust-lang.org), Debian's cross
# linker and qemu-user; it installs what is missing. Not part of the default test command: the
# CI machine reaches only the package registries, not rustup's server.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    apt-get update -q && apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --lib --target aarch64-unknown-linux-gnu "$@"
