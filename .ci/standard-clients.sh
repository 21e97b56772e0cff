#!/usr/bin/env bash
# Starts the real broker and checks that standard gRPC tools see it without
# the proto files: buf curl through server reflection, and Python's
# grpcio-health-checking for the health service.
# Usage: standard-clients.sh TIDINGS_BINARY BUF_BINARY CACHE_DIR
set -euo pipefail
TIDINGS="$1"
BUF="$2"
CACHE="$3"

DATA="$(mktemp -d)"
OUT="$DATA/stdout"
"$TIDINGS" serve --listen 127.0.0.1:0 --data-dir "$DATA/db" >"$OUT" 2>"$DATA/stderr" &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do
  grep -q "listening on" "$OUT" && break
  sleep 0.1
done
ADDR="$(sed -n 's/^tidings listening on //p' "$OUT")"
[ -n "$ADDR" ] || { cat "$DATA/stderr"; echo "broker did not start"; exit 1; }
echo "broker on $ADDR"

# Reflection: buf curl lists every service and calls one by name.
SERVICES="$("$BUF" curl --protocol grpc --http2-prior-knowledge --list-services "http://$ADDR")"
echo "$SERVICES"
for s in tidings.v1.PublisherService tidings.v1.SubscriberService tidings.v1.AdminService grpc.health.v1.Health; do
  grep -qx "$s" <<<"$SERVICES" || { echo "reflection does not list $s"; exit 1; }
done
"$BUF" curl --protocol grpc --http2-prior-knowledge \
  -d '{"topic":{"name":"smoke"}}' "http://$ADDR/tidings.v1.AdminService/CreateTopic"
HEALTH="$("$BUF" curl --protocol grpc --http2-prior-knowledge -d '{}' "http://$ADDR/grpc.health.v1.Health/Check")"
echo "$HEALTH"
grep -q SERVING <<<"$HEALTH"

# Python's standard health client.
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-health-checking
"$VENV/bin/python" - "$ADDR" <<'PY'
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ["", "tidings.v1.PublisherService", "tidings.v1.SubscriberService", "tidings.v1.AdminService"]:
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        print(f"health {service or '(server)'}: {name}")
        assert name == "SERVING", (service, name)
PY

# Graceful shutdown on SIGTERM.
kill -TERM "$PID"
wait "$PID"
echo "broker stopped cleanly on SIGTERM"
