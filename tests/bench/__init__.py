"""Tests of bench/: the benchmarks' accounting and their command lines on tiny runs."""
