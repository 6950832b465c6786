#!/usr/bin/env bash
# Set everything up, then run genserve on the bundled models.
# Until the gRPC server lands (issue 4), this evaluates the bundled models instead: the figures
# in the README's table, from the files in models/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m training.eval models/vae.safetensors models/gan.safetensors models/transformer.safetensors "$@"
