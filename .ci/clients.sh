#!/usr/bin/env bash
# CI for the Python and TypeScript clients (clients/): installs what they
# need, checks that the generated code is up to date, runs `buf breaking`
# against main, then both test suites against the real broker binary
# (including the TypeScript-producer / Python-consumer exchange of 10,000
# messages), each twice: against a plain-text broker, and against one with
# TLS and access control (TIDINGS_TEST_SECURE=1: test certificates made with
# openssl by clients/test-certs.sh, an admin token).
#
# Usage, from the repository root:
#   bash .ci/clients.sh TIDINGS_BINARY CACHE_DIR BUF_BINARY
#
# CACHE_DIR keeps the Python venv (clients-venv) and the npm install
# (clients-node-<lockfile hash>, linked as clients/typescript/node_modules)
# between runs.
set -euo pipefail

if [ "$#" -ne 3 ]; then
  echo "usage: bash .ci/clients.sh TIDINGS_BINARY CACHE_DIR BUF_BINARY" >&2
  exit 2
fi
TIDINGS="$(realpath "$1")"
mkdir -p "$2"
CACHE="$(realpath "$2")"
BUF="$(realpath "$3")"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
TS="$ROOT/clients/typescript"

step() { printf '\n=== clients: %s (%s)\n' "$1" "$(date +%T)"; }
[ -x "$TIDINGS" ] || { echo "no broker binary at $TIDINGS" >&2; exit 1; }
[ -x "$BUF" ] || { echo "no buf binary at $BUF" >&2; exit 1; }

step "python venv ($CACHE/clients-venv)"
VENV="$CACHE/clients-venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e "clients/python[test,generate]"
"$VENV/bin/python" -c 'import grpc, google.protobuf, tidings; print("grpcio", grpc.__version__, "protobuf", google.protobuf.__version__)'

step "npm ci (clients/typescript)"
LOCK_HASH="$(cat "$TS/package.json" "$TS/package-lock.json" | sha256sum | cut -c1-16)"
NODE_DIR="$CACHE/clients-node-$LOCK_HASH"
if [ ! -d "$NODE_DIR/node_modules" ]; then
  rm -rf "$NODE_DIR.tmp"
  mkdir -p "$NODE_DIR.tmp"
  cp "$TS/package.json" "$TS/package-lock.json" "$NODE_DIR.tmp/"
  (cd "$NODE_DIR.tmp" && npm ci --no-audit --no-fund)
  # Keep one install: drop those of earlier lockfiles.
  find "$CACHE" -maxdepth 1 -name 'clients-node-*' ! -name "clients-node-$LOCK_HASH.tmp" -exec rm -rf {} +
  mv "$NODE_DIR.tmp" "$NODE_DIR"
fi
if [ "$(readlink "$TS/node_modules" 2>/dev/null || true)" != "$NODE_DIR/node_modules" ]; then
  rm -rf "$TS/node_modules"
  ln -s "$NODE_DIR/node_modules" "$TS/node_modules"
fi

step "generated code is up to date (clients/generate.sh)"
snapshot() {
  git status --porcelain --untracked-files=all -- clients/
  find clients/python/src/tidings/v1 clients/typescript/src/gen -type f ! -path '*/__pycache__/*' -print0 |
    sort -z | xargs -0 sha256sum
}
CLEAN_BEFORE="$(git status --porcelain --untracked-files=all -- clients/)"
BEFORE="$(snapshot)"
PYTHON="$VENV/bin/python" BUF="$BUF" bash clients/generate.sh
AFTER="$(snapshot)"
if [ "$BEFORE" != "$AFTER" ]; then
  echo "clients/generate.sh changed the generated code: commit the regenerated files" >&2
  diff <(echo "$BEFORE") <(echo "$AFTER") >&2 || true
  git diff --stat -- clients/ >&2 || true
  exit 1
fi
if [ -z "$CLEAN_BEFORE" ]; then
  # A clean checkout (as in CI): nothing tracked changed, nothing new appeared.
  git diff --exit-code --stat -- clients/
  UNTRACKED="$(git ls-files --others --exclude-standard -- clients/)"
  if [ -n "$UNTRACKED" ]; then
    echo "generated files not committed:" >&2
    echo "$UNTRACKED" >&2
    exit 1
  fi
fi
echo "generated code is up to date"

step "buf breaking against main"
"$BUF" breaking --against '.git#branch=main'
echo "no breaking change to the wire API"

command -v openssl >/dev/null || { echo "the secure test runs need the openssl command" >&2; exit 1; }
mode_name() { if [ "$1" = 1 ]; then echo "TLS + token broker"; else echo "plain-text broker"; fi; }

step "typescript: build"
(cd "$TS" && node_modules/.bin/tsc -p tsconfig.json)
NODE_LOG="$(mktemp)"
trap 'rm -f "$NODE_LOG"' EXIT
for SECURE in 0 1; do
  step "typescript: node --test, $(mode_name "$SECURE")"
  set +e
  (cd "$TS" && TIDINGS_BIN="$TIDINGS" TIDINGS_TEST_SECURE="$SECURE" node --test dist/test/*.test.js) >"$NODE_LOG" 2>&1
  NODE_STATUS=$?
  set -e
  if [ "$NODE_STATUS" -ne 0 ] || ! grep -qE '^# pass [1-9]' "$NODE_LOG" || ! grep -qx '# fail 0' "$NODE_LOG"; then
    cat "$NODE_LOG"
    echo "typescript tests failed against a $(mode_name "$SECURE") (exit $NODE_STATUS)" >&2
    exit 1
  fi
  grep -E '^(ok|not ok) [0-9]+ - |^# (tests|suites|pass|fail|cancelled|skipped|todo|duration_ms) ' "$NODE_LOG"
done

export TIDINGS_BIN="$TIDINGS"
export TIDINGS_REQUIRE_CROSS_LANGUAGE=1
if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
  export TIDINGS_TEST_POSTGRES="${TIDINGS_TEST_POSTGRES:-host=127.0.0.1 port=5432 user=postgres dbname=test}"
fi
for SECURE in 0 1; do
  step "python: pytest (with the cross-language test), $(mode_name "$SECURE")"
  set +e
  (cd clients/python && TIDINGS_TEST_SECURE="$SECURE" "$VENV/bin/python" -m pytest -p no:cacheprovider)
  PYTEST_STATUS=$?
  set -e
  if [ "$PYTEST_STATUS" -eq 5 ]; then
    echo "pytest collected no tests" >&2
    exit 1
  elif [ "$PYTEST_STATUS" -ne 0 ]; then
    echo "python tests failed against a $(mode_name "$SECURE") (exit $PYTEST_STATUS)" >&2
    exit 1
  fi
done

step "clients: all green"
