#!/usr/bin/env bash
# The test command: starts the local servers if they are down, then runs
# every test of every crate with every feature. Extra arguments go to
# `cargo test` (for example `-p outbox-core`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo test --workspace --all-features "$@"
