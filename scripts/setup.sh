#!/usr/bin/env bash
# Create .venv (Python 3.11) and install genserve with its pinned dependencies.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# constraints.txt pins exact versions (torch 2.13.0 CPU build among them); extras: server = python -m server,
# train = python -m training, dev = both plus tests and linters, bench = benchmark peers
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${GENSERVE_EXTRAS:-dev,bench}]"
# engine/kernels' C++ (the decode step's attention), built once per machine; without a compiler the torch fallback serves
.venv/bin/python -m engine.kernels --allow-fallback
