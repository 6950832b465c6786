"""Tests of engine/: decoding, image generation, model files, the registry, the engine's face."""
