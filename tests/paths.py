"""Where things are: the checkout's root (tests run from it, and start processes in it)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
