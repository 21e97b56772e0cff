#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (issue 12), each for a while, one after
# the other; stops at the first failure, naming the input that caused it.
#
#   scripts/fuzz.sh                  # every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh # longer
#   scripts/fuzz.sh page_token ack_id
#
# Environment (each has a default):
#   FUZZ_SECONDS      how long each target runs (60)
#   FUZZ_SANITIZER    cargo fuzz's sanitizer (none: the crate forbids unsafe
#                     code, so AddressSanitizer would only halve the speed)
#   FUZZ_TARGET_DIR   where the fuzz build goes (fuzz/target)
#   FUZZ_CORPUS_DIR   where each target's corpus grows (fuzz/corpus); the
#                     committed seeds in fuzz/seeds/<target> are read too
#
# Works on the stable toolchain: cargo fuzz needs a few unstable flags,
# which RUSTC_BOOTSTRAP=1 allows. Installs cargo-fuzz if it is missing
# (into CARGO_FUZZ_ROOT if that is set).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${FUZZ_SECONDS:-60}"
SANITIZER="${FUZZ_SANITIZER:-none}"
TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/fuzz/target}"
CORPUS_DIR="${FUZZ_CORPUS_DIR:-$PWD/fuzz/corpus}"
CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1

if [ -n "${CARGO_FUZZ_ROOT:-}" ]; then
  export PATH="$CARGO_FUZZ_ROOT/bin:$PATH"
fi
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  # In a temporary target directory, not one meant for this crate.
  env -u CARGO_TARGET_DIR cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" ${CARGO_FUZZ_ROOT:+--root "$CARGO_FUZZ_ROOT"}
fi

if [ "$#" -gt 0 ]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(cargo fuzz list)
fi

# Debug assertions on, so that an overflow is a failure and not a wrap.
BUILD=(-s "$SANITIZER" --debug-assertions --target-dir "$TARGET_DIR")
cargo fuzz build "${BUILD[@]}"

for t in "${TARGETS[@]}"; do
  mkdir -p "$CORPUS_DIR/$t"
  echo "=== $t: ${SECONDS_EACH}s"
  log="$(mktemp)"
  if ! cargo fuzz run "${BUILD[@]}" "$t" "$CORPUS_DIR/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/." >&2
    echo "Rerun it with: RUSTC_BOOTSTRAP=1 cargo fuzz run ${BUILD[*]} $t fuzz/artifacts/$t/<file>" >&2
    rm -f "$log"
    exit 1
  fi
  grep -aE '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$log" || true
  echo "corpus: $(find "$CORPUS_DIR/$t" -type f | wc -l) inputs"
  rm -f "$log"
done
echo "${#TARGETS[@]} passed, 0 failed"
