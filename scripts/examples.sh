#!/usr/bin/env bash
# Builds every example and runs each one with a timeout, checking that it
# exits 0 and prints its key line. The broker examples need the local
# servers (scripts/services.sh starts them); Kafka is librdkafka's
# in-process mock cluster unless KAFKA_BROKERS is set.
#
#   scripts/examples.sh                 build and run every example
#   scripts/examples.sh quickstart ...  build all, run only those named
#
# Honours CARGO_TARGET_DIR; EXAMPLE_TIMEOUT (seconds, default 60) bounds
# each run.
set -euo pipefail
cd "$(dirname "$0")/.."

# name|line its output must contain
checks=(
  "quickstart|rolled-back order 2 published: no"
  "custom_transport|transport conformance: passed"
  "postgres_nats|rolled-back order 2 published: no"
  "postgres_amqp|rolled-back order 2 published: no"
  "postgres_kafka|rolled-back order 2 published: no"
  "postgres_redis|rolled-back order 2 published: no"
  "mixed_routing|every message arrived where its route sends it"
)

for name in "$@"; do
  if [[ " ${checks[*]%%|*} " != *" $name "* ]]; then
    echo "examples: no example named $name (known: ${checks[*]%%|*})" >&2
    exit 2
  fi
done

echo "examples: building"
cargo build -p outbox-examples --examples --features brokers
bin="${CARGO_TARGET_DIR:-target}/debug/examples"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

failed=()
for check in "${checks[@]}"; do
  name="${check%%|*}"
  want="${check#*|}"
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then
    continue
  fi
  start=$SECONDS
  status=0
  timeout "${EXAMPLE_TIMEOUT:-60}" "$bin/$name" >"$out/$name.log" 2>&1 || status=$?
  took=$((SECONDS - start))
  if [ "$status" -ne 0 ]; then
    reason="exit status $status"
    [ "$status" -eq 124 ] && reason="timed out after ${EXAMPLE_TIMEOUT:-60}s"
  elif ! grep -qF -- "$want" "$out/$name.log"; then
    reason="its output lacks \"$want\""
  else
    echo "examples: $name ok (${took}s)"
    continue
  fi
  echo "examples: $name FAILED: $reason; its output:"
  sed 's/^/    /' "$out/$name.log"
  failed+=("$name")
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "examples: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "examples: all passed"
