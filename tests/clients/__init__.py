"""Tests of clients/: the SDK (against a fake server and a real one) and the command line."""
