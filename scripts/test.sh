#!/usr/bin/env bash
# The test command: starts the local servers if they are down, then runs
# every test of every crate with every feature, and prints the summary line
# of each end-to-end and fault scenario at the end. Extra arguments go to
# `cargo test` (for example `-p outbox-core`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
export OUTBOX_SUMMARY_FILE="${OUTBOX_SUMMARY_FILE:-$(mktemp -t outbox-summary.XXXXXX)}"
: > "$OUTBOX_SUMMARY_FILE"
status=0
cargo test --workspace --all-features --no-fail-fast "$@" || status=$?
# A fault scenario restarts servers; make sure they are all up again.
scripts/services.sh >/dev/null || status=1
if [ -s "$OUTBOX_SUMMARY_FILE" ]; then
  echo
  echo "== scenario summaries"
  cat "$OUTBOX_SUMMARY_FILE"
fi
exit $status
