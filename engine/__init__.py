"""genserve inference engine: model files, model architectures and (later) batched generation.

The model architectures live here rather than in ``training`` so that a model is rebuilt from
its exported file alone, without the training code.
"""
