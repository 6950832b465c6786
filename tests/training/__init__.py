"""Tests of training/: the loop, runs, checkpoints, data, evaluation, the command line."""
