"""Tests of server/: its settings, metrics and ingresses here, the layers in the folders beside."""
