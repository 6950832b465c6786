"""Training for genserve's three generative models: ``python -m training --help``."""
