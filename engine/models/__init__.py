"""The built-in model architectures; each module defines its ``KIND`` (engine/kinds.py)."""
