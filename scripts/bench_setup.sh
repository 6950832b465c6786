#!/usr/bin/env bash
# Install what the benchmarks need beyond the Python environment (scripts/setup.sh):
# - h2load, nghttp2's HTTP/2 load generator, which drives the plain Generate calls (bench/h2load.py);
# - bench/amqp's node packages (amqplib), for bench.scaleout's AMQP load generator (bench/amqp/load.mjs),
#   when node and npm are there (bench.scaleout falls back to the Python AMQP client without them).
# Idempotent: skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/node_setup.sh
if command -v h2load >/dev/null 2>&1; then
  echo "h2load: $(command -v h2load) ($(h2load --version 2>/dev/null | head -1))"
  exit 0
fi
exec </dev/null  # nothing below may wait for an answer
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1 || ! sudo -n true 2>/dev/null; then
    echo "bench_setup: skipped installing h2load (not root, and sudo would ask for a password); as root: apt-get install nghttp2-client" >&2
    exit 1
  fi
  SUDO="sudo -n"
fi
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q nghttp2-client  # Debian / Ubuntu: h2load is in nghttp2-client
elif command -v dnf >/dev/null 2>&1; then
  $SUDO dnf install -y nghttp2  # Fedora / RHEL
elif command -v brew >/dev/null 2>&1; then
  brew install nghttp2
else
  echo "bench_setup: install nghttp2's h2load with your package manager (Debian: nghttp2-client)" >&2
  exit 1
fi
command -v h2load
