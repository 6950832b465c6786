#!/usr/bin/env bash
# Set everything up, then run the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/node_setup.sh  # bench/amqp/load.mjs for tests/bench/test_scaleout.py (skipped without node)
bash scripts/front_setup.sh  # HAProxy, for the server's --front-limit and tests/server/runtime/test_front.py
bash scripts/browser_setup.sh  # Debian's Chromium, for the playground's browser test (tests/server/http_edge/test_playground.py)
.venv/bin/python scripts/gen_proto.py --check
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy engine training server clients scripts tests bench
MYPYPATH=.:tests/kinds/genserve-blobs .venv/bin/mypy -p genserve_blobs  # the example kind, a package of its own
.venv/bin/python -m pytest -q "$@"
bash scripts/check_client_install.sh  # `pip install .` is the SDK and CLI only: no torch
