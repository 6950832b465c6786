"""The character transformer (engine/models/transformer.py): causal, bounded by its context, and it
overfits one small batch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from engine.modelfile import export_model, load_model
from engine.models.transformer import CharTransformer, TransformerConfig


@pytest.mark.parametrize("block", ["gpt2", "original"])
def test_transformer_is_causal(block: Literal["gpt2", "original"]) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, d_model=16, d_ff=32, dropout=0.1, block=block)
    model = CharTransformer(cfg).eval()
    idx = torch.randint(0, 11, (3, 12))
    with torch.no_grad():
        base = model(idx)
        for t in range(12):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 11
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            # the changed position (and later ones) must see the change, or the test proves nothing
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3


def test_transformer_rejects_too_long_input() -> None:
    model = CharTransformer(TransformerConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=4, d_ff=8))
    with pytest.raises(ValueError, match=r"sequence of 5 tokens exceeds the context window of 4"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("block", ["gpt2", "original"])
def test_transformer_overfits_one_batch(block: Literal["gpt2", "original"]) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, d_model=32, d_ff=64, dropout=0.0, block=block)
    model = CharTransformer(cfg)
    data = torch.randint(0, 11, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def ce() -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1))

    with torch.no_grad():
        start = float(ce())
    for _ in range(200):
        loss = ce()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(ce())
    assert start == pytest.approx(math.log(11), abs=0.3)  # small init: near-uniform predictions
    assert end < 0.1, (start, end)


def test_files_exported_with_the_old_block_name_load_as_original(tmp_path: Path) -> None:
    """``block="seed"`` was the post-LN/ReLU block's name in files exported before it was renamed."""
    config = TransformerConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=4, d_ff=8, block="original")
    path = tmp_path / "old.safetensors"
    export_model(path, "char-transformer", CharTransformer(config), vocab="abcde")
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    metadata["config"] = json.dumps({**json.loads(metadata["config"]), "block": "seed"})
    save_file(tensors, str(path), metadata=metadata)
    loaded = load_model(path)
    assert loaded.config.block == "original"
