"""``python -m engine.kernels``: build the native kernels now (scripts/setup.sh does), and say whether they are in use."""

from __future__ import annotations

import sys

from engine.kernels import native_decode_attention
from engine.logs import configure_logging

if __name__ == "__main__":
    configure_logging()
    sys.exit(0 if native_decode_attention() or "--allow-fallback" in sys.argv[1:] else 1)
