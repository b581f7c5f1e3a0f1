#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh machine, then runs
# the whole suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

# Release mode: the numeric tests (finite differences, the MLP) run an order of magnitude faster.
cargo test --release --all-targets "$@"
