#!/usr/bin/env bash
# The end-to-end example under fire: service A (orders_producer.py, Python,
# SQLite) keeps committing orders with their notifications in its outbox;
# `tidings relay` moves them to `tidings serve`; service B (the `shipping`
# example, Rust, SQLite) processes them through its inbox. Meanwhile this
# script kills the broker, the relay and the consumer with SIGKILL at random
# and restarts them. At the end it stops A, lets everything drain, and
# compares A's orders with B's shipments: 0 lost, 0 doubled, 0 out of order.
#
#   examples/kill.sh            # 60 seconds of kills
#   examples/kill.sh --short    # 20 seconds (what CI runs)
#
# TIDINGS_BIN and SHIPPING_BIN name the binaries; by default they are built
# with `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=60
[ "${1:-}" = "--short" ] && DURATION=20

TARGET="${CARGO_TARGET_DIR:-target}"
if [ -z "${TIDINGS_BIN:-}" ] || [ -z "${SHIPPING_BIN:-}" ]; then
  cargo build --release --quiet --bin tidings --example shipping
  TIDINGS_BIN="${TIDINGS_BIN:-$TARGET/release/tidings}"
  SHIPPING_BIN="${SHIPPING_BIN:-$TARGET/release/examples/shipping}"
fi

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BROKER_URL="http://127.0.0.1:$PORT"
export TIDINGS_BROKER="$BROKER_URL" RUST_LOG="${RUST_LOG:-warn}"
echo "work dir $WORK, broker $BROKER_URL, $DURATION s of kills"

start_broker() {
  "$TIDINGS_BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/broker" \
    --poll-interval 100ms >>"$WORK/broker.out" 2>>"$WORK/broker.log" &
  BROKER=$!
  PIDS+=("$BROKER")
  # The bound port is announced on standard output.
  for _ in $(seq 1 100); do
    [ "$(grep -c 'tidings listening' "$WORK/broker.out" 2>/dev/null)" -ge "$1" ] && return
    sleep 0.1
  done
  echo "broker did not start"; cat "$WORK/broker.log"; exit 1
}
start_relay() {
  "$TIDINGS_BIN" relay --database-url "sqlite://$WORK/a.db" --create-if-missing --poll-interval 50ms \
    --retry-max 500ms >>"$WORK/relay.out" 2>>"$WORK/relay.log" &
  RELAY=$!
  PIDS+=("$RELAY")
}
start_consumer() {
  "$SHIPPING_BIN" --broker "$BROKER_URL" --database-url "sqlite://$WORK/b.db" \
    >>"$WORK/consumer.out" 2>>"$WORK/consumer.log" &
  CONSUMER=$!
  PIDS+=("$CONSUMER")
}

BROKER_STARTS=1
start_broker $BROKER_STARTS
"$TIDINGS_BIN" topics create orders >/dev/null
"$TIDINGS_BIN" subscriptions create shipping --topic orders --ordered --start earliest >/dev/null
python3 examples/orders_producer.py --db "$WORK/a.db" --rate 200 >"$WORK/producer.out" &
PRODUCER=$!
PIDS+=("$PRODUCER")
start_relay
start_consumer

kills=0
end=$((SECONDS + DURATION))
while [ "$SECONDS" -lt "$end" ]; do
  sleep "$(python3 -c 'import random; print(round(random.uniform(0.3, 2.0), 2))')"
  case $((RANDOM % 3)) in
    0) kill -9 "$BROKER"; wait "$BROKER" 2>/dev/null || true
       sleep 0.3; BROKER_STARTS=$((BROKER_STARTS + 1)); start_broker $BROKER_STARTS; victim=broker ;;
    1) kill -9 "$RELAY"; wait "$RELAY" 2>/dev/null || true
       sleep 0.3; start_relay; victim=relay ;;
    2) kill -9 "$CONSUMER"; wait "$CONSUMER" 2>/dev/null || true
       sleep 0.3; start_consumer; victim=consumer ;;
  esac
  kills=$((kills + 1))
  echo "kill $kills: $victim"
done

# Whatever exited on its own meanwhile (a consumer that gave up waiting for a
# killed broker, say) is started again before the end.
kill -0 "$BROKER" 2>/dev/null || { BROKER_STARTS=$((BROKER_STARTS + 1)); start_broker $BROKER_STARTS; }
kill -0 "$RELAY" 2>/dev/null || start_relay
kill -0 "$CONSUMER" 2>/dev/null || start_consumer
kill -TERM "$PRODUCER"; wait "$PRODUCER" || true
cat "$WORK/producer.out"
echo "$kills kills; waiting for the relay and the consumer to catch up"
python3 examples/check.py --orders "$WORK/a.db" --shipments "$WORK/b.db" --wait 120
