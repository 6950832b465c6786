"""Hugging Face's GPT-2, loaded with our weights, gives the same logits: an independent oracle."""

from __future__ import annotations

import pytest
import torch

from engine.modelfile import load_model
from engine.models.transformer import CharTransformer, TransformerConfig

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]' installs it)")

from bench.interop import hf_logits, to_hf_gpt2
from tests.paths import ROOT

BUNDLED = ROOT / "models" / "transformer.safetensors"


def test_random_tiny_transformer_matches_gpt2() -> None:
    torch.manual_seed(0)
    model = CharTransformer(TransformerConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, d_model=8, d_ff=32, dropout=0.0)).eval()
    ids = torch.randint(0, 11, (3, 16))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, hf_logits(to_hf_gpt2(model), ids), rtol=1e-5, atol=1e-5)


def test_bundled_transformer_matches_gpt2() -> None:
    loaded = load_model(BUNDLED)
    assert isinstance(loaded.module, CharTransformer) and loaded.vocab is not None
    text = "ROMEO:\nWhat light through yonder window breaks?\n"
    ids = torch.tensor([[loaded.vocab.index(c) for c in text]])
    with torch.no_grad():
        ours = loaded.module(ids)
    torch.testing.assert_close(ours, hf_logits(to_hf_gpt2(loaded.module), ids), rtol=1e-4, atol=1e-4)


def test_seed_block_is_refused() -> None:
    model = CharTransformer(TransformerConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=4, d_ff=8, block="original"))
    with pytest.raises(ValueError, match="only the gpt2 block layout maps onto GPT-2"):
        to_hf_gpt2(model)
