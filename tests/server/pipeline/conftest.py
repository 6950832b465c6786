"""The stage tests' models (a tiny VAE and a tiny text model, loaded once per module) and an engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine.engine import Engine
from engine.modelfile import export_model
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.models.vae import VAE, VAEConfig
from engine.registry import ModelRegistry, ServedModel
from server.config import ServerConfig

VOCAB = "\n !,.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    text = CharTransformer(TransformerConfig(vocab_size=len(VOCAB), block_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32, dropout=0.0))
    export_model(folder / "text.safetensors", "char-transformer", text, vocab=VOCAB)
    export_model(folder / "digits.safetensors", "vae", VAE(VAEConfig(hidden_dim=8, latent_dim=4)))
    return ModelRegistry.from_folder(folder)


@pytest.fixture
def digits(registry: ModelRegistry) -> ServedModel:
    return registry.get("digits")


@pytest.fixture
def text_model(registry: ModelRegistry) -> ServedModel:
    return registry.get("text")


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = Engine(ServerConfig(decode_batch=4, decode_pending=4, max_new_tokens=4096).engine_limits())  # long sequences to cancel
    yield e
    e.close()
