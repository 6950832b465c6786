#!/usr/bin/env bash
# bench/amqp's node packages (amqplib, pinned in bench/amqp/package-lock.json), for bench.scaleout's
# AMQP load generator; scripts/test.sh runs this too, so its test runs. Without npm (or the npm
# registry) it says so and succeeds: bench.scaleout then uses the Python AMQP client, and the test
# skips, naming this script.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "node_setup: node/npm not found: bench.scaleout's AMQP half will use the Python client"
  exit 0
fi
if [ -d bench/amqp/node_modules/amqplib ]; then
  echo "node_setup: bench/amqp/node_modules is installed"
  exit 0
fi
if ! npm ci --prefix bench/amqp --no-audit --no-fund --loglevel=error; then  # e.g. no registry reachable
  echo "node_setup: npm ci failed: bench.scaleout's AMQP half will use the Python client" >&2
  exit 0
fi
echo "node_setup: installed bench/amqp/node_modules ($(node --version))"
