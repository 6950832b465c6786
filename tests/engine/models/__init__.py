"""Tests of engine/models/: each architecture's maths and properties."""
