#!/usr/bin/env bash
# The fault-injection suite's long form (issue 11): the same tests that
# `cargo test` runs in short form (tests/it/faults/), with more and longer
# faults, one scenario at a time, printing each scenario's checker summary.
#
#   scripts/faults.sh                 # 50 cycles per scenario, faults up to 3 s
#   scripts/faults.sh process         # one module: process, disk, postgres, network
#   scripts/faults.sh process::sigkill # or the start of a test's path below it
#
# Environment (each has a default):
#   TIDINGS_FAULTS_CYCLES     fault cycles per scenario (50)
#   TIDINGS_FAULTS_SECONDS    the longest one fault lasts, in seconds (3)
#   TIDINGS_FAULTS_SEED       seed of the random choices (default: the clock)
#   TIDINGS_TEST_DATABASE_URL PostgreSQL for the PostgreSQL scenarios
#                             (default postgres://postgres@127.0.0.1:5432/postgres)
# The disk-full scenario mounts a tmpfs, so it needs root; without it, it is
# skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."

export TIDINGS_FAULTS_CYCLES="${TIDINGS_FAULTS_CYCLES:-50}"
export TIDINGS_FAULTS_SECONDS="${TIDINGS_FAULTS_SECONDS:-3}"
export TIDINGS_TEST_DATABASE_URL="${TIDINGS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
FILTER="faults::${1:-}"

echo "fault suite: $TIDINGS_FAULTS_CYCLES cycles per scenario, faults up to ${TIDINGS_FAULTS_SECONDS}s, filter $FILTER"
# One scenario at a time: each runs a broker and its load, and their
# timeouts should be the faults', not an overloaded machine's.
cargo test --test it "$FILTER" -- --test-threads=1 --nocapture
