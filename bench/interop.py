"""Load genserve's Transformer into Hugging Face transformers' GPT-2, an independent implementation.

Used as a correctness oracle (tests) and as a speed peer (benchmarks). ``transformers`` is an
optional dependency (the ``dev`` extra); it is imported only when this is called.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.models.transformer import CharTransformer

# HF's Conv1D stores weights as (in, out): our nn.Linear (out, in) weights are transposed.
_BLOCK_MAP = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.c_attn.weight": ("attn.qkv.weight", True),
    "attn.c_attn.bias": ("attn.qkv.bias", False),
    "attn.c_proj.weight": ("attn.proj.weight", True),
    "attn.c_proj.bias": ("attn.proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.c_fc.weight": ("mlp.fc.weight", True),
    "mlp.c_fc.bias": ("mlp.fc.bias", False),
    "mlp.c_proj.weight": ("mlp.proj.weight", True),
    "mlp.c_proj.bias": ("mlp.proj.bias", False),
}


def to_hf_gpt2(model: CharTransformer, attn_implementation: str = "sdpa") -> Any:
    """A ``GPT2LMHeadModel`` (eval mode) holding the same weights as ``model``; ``attn_implementation``:
    transformers' own choice (``sdpa``, its default) or ``eager`` (its matmul-softmax attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    if cfg.block != "gpt2":
        raise ValueError(f"only the gpt2 block layout maps onto GPT-2, not {cfg.block!r}")
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_ff,
        activation_function="gelu",  # exact GELU, as nn.GELU(); GPT-2's default is the tanh form
        layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    hf_config._attn_implementation = attn_implementation
    hf = GPT2LMHeadModel(hf_config)
    ours = model.state_dict()
    state = {"transformer.wte.weight": ours["tok_emb.weight"], "transformer.wpe.weight": ours["pos_emb.weight"]}
    state["transformer.ln_f.weight"] = ours["ln_f.weight"]
    state["transformer.ln_f.bias"] = ours["ln_f.bias"]
    for i in range(cfg.n_layer):
        for hf_name, (our_name, transpose) in _BLOCK_MAP.items():
            t = ours[f"blocks.{i}.{our_name}"]
            state[f"transformer.h.{i}.{hf_name}"] = t.t().contiguous() if transpose else t
    state["lm_head.weight"] = ours["tok_emb.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # whatever is left must be non-parameter buffers (older versions keep a causal-mask buffer)
    params = {n for n, _ in hf.named_parameters()}
    if unexpected or any(m in params for m in missing):
        raise RuntimeError(f"GPT-2 mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


@torch.no_grad()
def hf_logits(hf: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of a GPT2LMHeadModel for token ids (B, T)."""
    return hf(input_ids=ids).logits


def hf_int8(hf: Any) -> Any:
    """``hf`` (a ``to_hf_gpt2`` model) with its blocks' linear layers in int8, as genserve's
    ``--decode-precision int8`` has them: GPT-2's Conv1D layers become ``nn.Linear`` and torch's
    dynamic quantization takes them (int8 weights per output row... per tensor here: torch's
    default, activations quantized per call); the tied head stays float32. Changes ``hf`` in place."""
    import warnings

    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for block in hf.transformer.h:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                    with torch.no_grad():
                        linear.weight.copy_(child.weight.t())
                        linear.bias.copy_(child.bias)
                    setattr(parent, name, linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        torch.ao.quantization.quantize_dynamic(hf.transformer.h, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return hf
