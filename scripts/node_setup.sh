#!/usr/bin/env bash
# Node packages, pinned in each folder's package-lock.json:
# - bench/amqp (amqplib), for bench.scaleout's AMQP load generator;
# - tests/interop (@grpc/grpc-js), the client that is not ours in tests/test_interop.py.
# scripts/test.sh runs this too, so their tests run. Without npm (or the npm registry) it says so
# and succeeds: bench.scaleout then uses the Python AMQP client, and the tests skip, naming this
# script (tests/test_interop.py fails instead with CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "node_setup: node/npm not found: bench.scaleout's AMQP half will use the Python client"
  exit 0
fi
install() {  # install DIR PACKAGE: npm ci in DIR unless PACKAGE is there
  if [ -d "$1/node_modules/$2" ]; then
    echo "node_setup: $1/node_modules is installed"
    return 0
  fi
  if ! npm ci --prefix "$1" --no-audit --no-fund --loglevel=error; then  # e.g. no registry reachable
    echo "node_setup: npm ci failed in $1: its node client is unavailable" >&2
    return 0
  fi
  echo "node_setup: installed $1/node_modules ($(node --version))"
}
install bench/amqp amqplib
install tests/interop @grpc/grpc-js
