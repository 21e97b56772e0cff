#!/usr/bin/env bash
# Regenerates the gRPC code of both clients from proto/ (run from anywhere).
#
#   Python:     python -m grpc_tools.protoc (grpcio-tools' bundled protoc and
#               well-known types) into python/src/tidings/v1/
#   TypeScript: buf generate with typescript/buf.gen.yaml (protoc-gen-es)
#               into typescript/src/gen/
#
# Needs grpcio-tools in $PYTHON (default: python3), e.g.
# `pip install -e 'clients/python[generate]'`, and `npm ci` in
# clients/typescript (for protoc-gen-es and buf; $BUF overrides the buf
# binary). The generated code is committed: rerun this after changing a proto.
set -euo pipefail

CLIENTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROTO="$CLIENTS/../proto"
PYTHON="${PYTHON:-python3}"
TS="$CLIENTS/typescript"
BUF="${BUF:-$TS/node_modules/.bin/buf}"

if ! "$PYTHON" -c 'import grpc_tools.protoc' 2>/dev/null; then
  echo "generate.sh: $PYTHON has no grpcio-tools; pip install -e 'clients/python[generate]'" >&2
  exit 1
fi
if [ ! -x "$TS/node_modules/.bin/protoc-gen-es" ] || [ ! -x "$BUF" ]; then
  echo "generate.sh: run 'npm ci' in clients/typescript first (protoc-gen-es, buf)" >&2
  exit 1
fi

# Python: messages, type stubs and gRPC stubs, imported as tidings.v1.*.
PY_OUT="$CLIENTS/python/src"
rm -rf "$PY_OUT/tidings/v1"
mkdir -p "$PY_OUT/tidings/v1"
(
  cd "$PROTO"
  "$PYTHON" -m grpc_tools.protoc -I . \
    --python_out="$PY_OUT" --pyi_out="$PY_OUT" --grpc_python_out="$PY_OUT" \
    tidings/v1/*.proto
)
printf '"""Generated gRPC code for the tidings.v1 API (clients/generate.sh)."""\n' \
  >"$PY_OUT/tidings/v1/__init__.py"

# TypeScript: buf.gen.yaml names the inputs and cleans src/gen first.
(cd "$TS" && "$BUF" generate)

echo "generated: python/src/tidings/v1, typescript/src/gen"
