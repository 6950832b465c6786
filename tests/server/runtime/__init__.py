"""Tests of server/runtime/: the app's life, the process, workers, the front, live models."""
