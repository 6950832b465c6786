"""Model architectures, keyed by the ``kind`` written into each exported file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from engine.models.classifier import ClassifierConfig, DigitClassifier
from engine.models.flow import FlowConfig, LatentFlow
from engine.models.gan import GANConfig, Generator
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig


@dataclass(frozen=True)
class ModelKind:
    """How to rebuild one kind of model: its config class and its module class."""

    name: str
    config_cls: type[Any]
    module_cls: type[nn.Module]
    summary: str


KINDS: dict[str, ModelKind] = {
    k.name: k
    for k in (
        ModelKind("vae", VAEConfig, VAE, "variational auto-encoder (decoder serves images)"),
        ModelKind("wgan-gp", GANConfig, Generator, "WGAN-GP generator"),
        ModelKind("char-transformer", TransformerConfig, CharTransformer, "character-level decoder-only Transformer"),
        ModelKind("mnist-classifier", ClassifierConfig, DigitClassifier, "digit classifier used by evaluation"),
        ModelKind(
            "flow", FlowConfig, LatentFlow, "latent flow matching (rectified flow) with a Transformer velocity network, decoded by a VAE"
        ),
    )
}

__all__ = [
    "KINDS",
    "VAE",
    "CharTransformer",
    "ClassifierConfig",
    "DigitClassifier",
    "GANConfig",
    "Generator",
    "ModelKind",
    "TransformerConfig",
    "VAEConfig",
]
