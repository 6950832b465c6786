#!/usr/bin/env bash
# Set everything up, then serve the bundled models (models/) over gRPC on 127.0.0.1:50051,
# with Prometheus metrics on :9464. Extra arguments go to `python -m server` (see --help);
# every option is also a GENSERVE_* environment variable.
set -euo pipefail
cd "$(dirname "$0")/.."
GENSERVE_EXTRAS=${GENSERVE_EXTRAS:-server} bash scripts/setup.sh  # the [server] extra: torch and the rest
exec .venv/bin/python -m server --models-dir models "$@"
