"""Character-level decoder-only Transformer.

The default block is GPT-2's (pre-LayerNorm, exact GELU, biases everywhere, tied input/output
embeddings, learned positions), so that Hugging Face's ``GPT2LMHeadModel`` can load the same
weights and serve as an independent correctness oracle. ``block="original"`` gives the reference script's
post-LayerNorm block with a ReLU feed-forward. Serving decodes through ``ScriptedForward``, the
cached forward as one graph (why: docs/design/decode-loop.md).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.jit._fuser import optimized_execution

from engine.kernels import native_decode_attention
from engine.kinds import Kind, Shape
from engine.limits import DECODE_PRECISIONS


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 65  # tiny shakespeare has 65 distinct characters
    block_size: int = 256  # context window in characters
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    d_ff: int = 1536  # 4 * d_model, as in GPT-2
    dropout: float = 0.1  # the reference script's rate; 0 at inference
    block: Literal["gpt2", "original"] = "gpt2"  # original: the reference script's post-LN/ReLU block
    layer_norm_eps: float = 1e-5  # GPT-2's

    RENAMED: ClassVar[dict[str, dict[str, str]]] = {"block": {"seed": "original"}}  # as files exported before 2026-12 say it


Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # F.linear's signature
if TYPE_CHECKING:
    LinearPacked = Any
else:  # the packed int8 layer's TorchScript class, as the graph's annotations name it
    LinearPacked = torch.classes.quantized.LinearPackedParamsBase


class InferenceLinears:
    """``F.linear`` for a frozen model, with each weight also kept transposed (in, out), contiguous.

    ``F.linear`` multiplies by the transpose of an (out, in) weight; MKL's sgemm is faster with the
    weight already (in, out) in memory, as GPT-2's Conv1D keeps it (docs/design/decode-loop.md).
    Results equal ``F.linear``'s to float rounding (bit for bit on the machines measured). The copies
    cost one more set of linear weights in memory (7 MB for the bundled model). Weights changed
    afterwards are not seen: build it once training is over.
    """

    def __init__(self, weights: Iterable[torch.Tensor]) -> None:
        with torch.no_grad():
            self._t = {id(w): (w, w.detach().t().contiguous()) for w in weights}  # id(weight) -> (weight, (in, out))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        entry = self._t.get(id(weight))
        if entry is None or entry[0] is not weight:
            return F.linear(x, weight, bias)
        wt = entry[1]
        x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
        y = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)  # (rows, out)
        return y.view(*x.shape[:-1], wt.shape[1])


DecodePrecision = Literal["float32", "int8"]  # engine/limits.py's DECODE_PRECISIONS


def _packed_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """A linear layer's weight as int8 (one scale per output row) packed for ``quantized::linear_dynamic``."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 calls quantized tensor creation deprecated (pytorch#184982); the packed op stays
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated")
        qw = torch.quantize_per_channel(w, scales, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())


class Int8Linears(InferenceLinears):
    """``InferenceLinears`` with every block's linear layer in int8 (``--decode-precision int8``): weights
    quantized once per output row, activations per call (``quantized::linear_dynamic``, 7-bit range
    as torch's own dynamic quantization uses on x86); the head stays float32. About 2.7x the float32
    linears' speed at decode sizes; what it costs in validation nats/char: docs/design/decode-loop.md."""

    def __init__(self, model: CharTransformer) -> None:
        super().__init__([model.tok_emb.weight])  # the head; the blocks' linears are packed below
        self._packed = {
            id(m.weight): (m.weight, _packed_int8(m.weight, m.bias)) for m in model.blocks.modules() if isinstance(m, nn.Linear)
        }

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] is not weight:
            return super().__call__(x, weight, bias)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), entry[1], True)
        return cast(torch.Tensor, y).view(*x.shape[:-1], y.shape[1])


def decode_attention_native(param: torch.Tensor) -> bool:
    """Whether decode steps with ``param``'s device and dtype run the compiled ``genserve::decode_attention``
    (CPU float32, where engine.kernels could build it); otherwise torch's attention with a mask."""
    return param.device.type == "cpu" and param.dtype == torch.float32 and native_decode_attention()


def _write_kv(kv: torch.Tensor, qkv: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, native: bool) -> None:
    """The new tokens' keys and values (qkv (B, T, 3, nh, hs)) into a layer's cache kv (2, B, nh, L, hs) at
    rows (B, 1), positions pos (B, T): one scatter for both. A decode step (T == 1) with ``native``
    writes through ``genserve::append_kv``, the same cells without torch's generic indexing. A float16 cache
    (``--decode-precision int8``) stores them rounded to float16."""
    if native and qkv.size(1) == 1:
        torch.ops.genserve.append_kv(kv, qkv[:, 0, 1:], pos[:, 0])
    else:
        kv[:, rows, :, pos] = qkv[:, :, 1:].to(kv.dtype)  # kv[:, rows, :, pos] is (B, T, 2, nh, hs)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, scale: float, native: bool
) -> torch.Tensor:
    """New tokens' queries q (B, nh, T, hs) against a layer's cached k, v (B, nh, L, hs). A decode step
    (T == 1) with ``native`` runs ``genserve::decode_attention`` over each row's own pos + 1 cells (torch's
    CPU kernels are 3-4x slower there once the cache outgrows the CPU's cache); otherwise SDPA with
    ``mask`` (B, 1, T, L). The two agree to float rounding. A float16 cache is read as float32."""
    if native and q.size(2) == 1:
        return torch.ops.genserve.decode_attention(q, k, v, pos[:, 0] + 1, scale)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)


def _linear(x: torch.Tensor, w: list[torch.Tensor], j: int, packed: list[LinearPacked], k: int) -> torch.Tensor:
    """x (rows, in) through a block's linear layer: float32 weight w[j] (in, out) and bias w[j + 1], or, when
    the block has packed int8 layers, the k-th of them (``Int8Linears``' op)."""
    if len(packed) > 0:
        return torch.ops.quantized.linear_dynamic(x, packed[k], True)
    return torch.addmm(w[j + 1], x, w[j])


def _forward_cached_graph(
    idx: torch.Tensor,
    pos: torch.Tensor,
    cache: torch.Tensor,
    tok_emb: torch.Tensor,
    pos_emb: torch.Tensor,
    layers: list[list[torch.Tensor]],
    packed: list[list[LinearPacked]],
    ln_f: list[torch.Tensor],
    head_t: torch.Tensor,
    n_head: int,
    eps: float,
    pre_ln: bool,
    native: bool,
) -> torch.Tensor:
    """``CharTransformer.forward_cached`` with ``InferenceLinears``, op for op, as one TorchScript graph
    (``ScriptedForward``). layers[i]: ln_1 w, b; qkv (in, out), bias; proj (in, out), bias; ln_2 w, b;
    fc (in, out), bias; mlp proj (in, out), bias. packed[i]: block i's qkv, proj, fc and mlp proj in int8
    (``Int8Linears``), or no packed lists at all (float32). head_t: the tied head, (d_model, vocab)."""
    b, t = idx.size(0), idx.size(1)
    c = tok_emb.size(1)
    hs = c // n_head
    span = cache.size(-2)
    hidden = (torch.arange(span, device=idx.device) > pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, L)
    mask = torch.zeros(hidden.shape, dtype=tok_emb.dtype, device=idx.device).masked_fill_(hidden, -math.inf)
    rows = torch.arange(b, device=idx.device).unsqueeze(1)
    x = F.embedding(idx, tok_emb) + F.embedding(pos, pos_emb)  # (B, T, C)
    scale = 1.0 / math.sqrt(hs)
    for i in range(len(layers)):
        w = layers[i]
        p = packed[i] if len(packed) > 0 else torch.jit.annotate(list[LinearPacked], [])
        kv = cache[i]  # (2, B, nh, L, hs)
        h = F.layer_norm(x, [c], w[0], w[1], eps) if pre_ln else x
        qkv = _linear(h.reshape(-1, c), w, 2, p, 0).view(b, t, 3, n_head, hs)
        _write_kv(kv, qkv, rows, pos, native)
        q = qkv[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
        y = _attend(q, kv[0], kv[1], mask, pos, scale, native)
        a = _linear(y.transpose(1, 2).reshape(b * t, c), w, 4, p, 1).view(b, t, c)
        if pre_ln:
            x = x + a
            h = F.layer_norm(x, [c], w[6], w[7], eps)
        else:
            x = F.layer_norm(x + a, [c], w[0], w[1], eps)
            h = x
        f = _linear(h.reshape(-1, c), w, 8, p, 2)
        f = F.gelu(f) if pre_ln else F.relu(f)
        m = _linear(f, w, 10, p, 3).view(b, t, c)
        x = x + m if pre_ln else F.layer_norm(x + m, [c], w[6], w[7], eps)
    if pre_ln:
        x = F.layer_norm(x, [c], ln_f[0], ln_f[1], eps)
    return torch.mm(x.reshape(-1, c), head_t).view(b, t, head_t.size(1))


def _layer_weights(blk: Block, t: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """One block's tensors in ``_forward_cached_graph``'s order; ``t`` transposes a linear weight."""
    attn, mlp = blk.attn, blk.mlp
    return [
        blk.ln_1.weight.detach(), blk.ln_1.bias.detach(), t(attn.qkv.weight), attn.qkv.bias.detach(),
        t(attn.proj.weight), attn.proj.bias.detach(), blk.ln_2.weight.detach(), blk.ln_2.bias.detach(),
        t(mlp.fc.weight), mlp.fc.bias.detach(), t(mlp.proj.weight), mlp.proj.bias.detach(),
    ]  # fmt: skip


@functools.cache
def _scripted_graph() -> Any:
    """``_forward_cached_graph`` compiled once per process (~0.1 s), on first use.

    TorchScript, though torch 2.x calls it deprecated: ``torch.compile`` of the decode step was
    slower than eager (docs/design/decode-loop.md), and a graph that TorchScript runs is what
    releases the GIL for a whole forward."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
        return torch.jit.script(_forward_cached_graph)


def cached_forward(
    model: CharTransformer, precision: DecodePrecision = "float32"
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The fastest ``forward_cached(idx, pos, cache)`` of a frozen ``model``: ``ScriptedForward``, or, where
    TorchScript cannot compile it (a torch without it), the eager one with ``InferenceLinears`` (a warning says so).
    ``precision`` int8: the blocks' linear layers in int8 (``Int8Linears``)."""
    if precision not in DECODE_PRECISIONS:
        raise ValueError(f"decode precision must be one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}")  # DecodeBatch's callers
    try:
        return ScriptedForward(model, precision)
    except Exception as e:  # torch.jit missing or refusing the graph: the eager path gives the same results
        warnings.warn(f"decoding eagerly: TorchScript could not compile the cached forward ({type(e).__name__}: {e})", stacklevel=2)
        linears = Int8Linears(model) if precision == "int8" else model.inference_linears()
        return functools.partial(model.forward_cached, linear=linears)


class ScriptedForward:
    """``CharTransformer.forward_cached`` (with ``InferenceLinears``) for a frozen model, run as one
    TorchScript graph: bit for bit the same ops and results, but the GIL is released once for the
    whole forward instead of around each of its ~60 torch ops.

    The decode thread runs beside the event loop, and an eager forward waits for the GIL between
    every two ops (docs/design/decode-loop.md). Run under ``torch.jit.optimized_execution(False)``:
    the profiling executor's rewrites are not bit-equal to eager, and shapes change every step.
    Holds transposed copies of the linear weights (as ``InferenceLinears``); weights changed
    afterwards are not seen. ``precision`` int8: the blocks' linears run as ``Int8Linears``' do.
    """

    def __init__(self, model: CharTransformer, precision: DecodePrecision = "float32") -> None:
        cfg = model.config
        with torch.no_grad():

            def t(w: torch.Tensor) -> torch.Tensor:
                return w.detach().t().contiguous()

            self._layers = [_layer_weights(blk, t) for blk in cast(Iterable[Block], model.blocks)]
            ln_f = model.ln_f
            self._ln_f = [ln_f.weight.detach(), ln_f.bias.detach()] if isinstance(ln_f, nn.LayerNorm) else []
            self._tok_emb, self._pos_emb = model.tok_emb.weight.detach(), model.pos_emb.weight.detach()
            self._head_t = t(model.tok_emb.weight)
            blocks = cast(Iterable[Block], model.blocks)
            self._packed: list[list[LinearPacked]] = (
                [[_packed_int8(m.weight, m.bias) for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)] for b in blocks]
                if precision == "int8"
                else []
            )
        self.precision = precision
        self._n_head, self._eps, self._pre_ln = cfg.n_head, cfg.layer_norm_eps, cfg.block == "gpt2"
        self.native = decode_attention_native(self._tok_emb)
        self._graph = _scripted_graph()

    def __call__(self, idx: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """``CharTransformer.forward_cached(idx, pos, cache, model.inference_linears())``."""
        with optimized_execution(False):
            return cast(
                torch.Tensor,
                self._graph(
                    idx, pos, cache, self._tok_emb, self._pos_emb, self._layers, self._packed, self._ln_f, self._head_t,
                    self._n_head, self._eps, self._pre_ln, self.native,
                ),
            )  # fmt: skip


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.n_head < 1 or cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_head {cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # GPT-2's c_attn: q, k, v side by side
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # GPT-2's c_proj
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v each (B, nh, T, hs)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        hs = c // self.n_head
        return tuple(y.view(b, t, self.n_head, hs).transpose(1, 2) for y in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.split_heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, scale=1 / math.sqrt(c // self.n_head)
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))

    def forward_cached(
        self,
        x: torch.Tensor,
        kv: torch.Tensor,
        where: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        linear: Linear = F.linear,
        native: bool = False,
    ) -> torch.Tensor:
        """Attention of new tokens against a KV cache (inference only; see ``CharTransformer.forward_cached``).

        x (B, T, C); kv (2, B, nh, L, hs), a view of this layer's keys and values; where = (rows (B, 1),
        pos (B, T)) the cache cells of the new tokens; mask (B, 1, T, L), 0 where a query may attend, else -inf.
        """
        b, t, c = x.shape
        hs = c // self.n_head
        qkv = linear(x, self.qkv.weight, self.qkv.bias).view(b, t, 3, self.n_head, hs)  # (B, T, 3, nh, hs)
        _write_kv(kv, qkv, where[0], where[1], native)
        q = qkv[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
        y = _attend(q, kv[0], kv[1], mask, where[1], 1 / math.sqrt(hs), native)  # (B, nh, T, hs)
        return linear(y.transpose(1, 2).reshape(b, t, c), self.proj.weight, self.proj.bias)


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)  # GPT-2's c_fc
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)  # GPT-2's c_proj
        self.act: nn.Module = nn.GELU() if cfg.block == "gpt2" else nn.ReLU()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))

    def forward_cached(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        """``forward`` for inference: no dropout, and linears through ``linear`` (e.g. ``InferenceLinears``)."""
        return linear(self.act(linear(x, self.fc.weight, self.fc.bias)), self.proj.weight, self.proj.bias)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.block == "gpt2"
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:  # GPT-2: x + f(LN(x))
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        # the reference script (and the original Transformer): LN(x + f(x))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))

    def forward_cached(
        self,
        x: torch.Tensor,
        kv: torch.Tensor,
        where: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        linear: Linear = F.linear,
        native: bool = False,
    ) -> torch.Tensor:
        """``forward`` for new tokens only, with attention against this layer's KV cache ``kv``."""
        mlp = self.mlp
        if self.pre_ln:
            x = x + self.attn.forward_cached(self.ln_1(x), kv, where, mask, linear, native)
            return x + mlp.forward_cached(self.ln_2(x), linear)
        x = self.ln_1(x + self.attn.forward_cached(x, kv, where, mask, linear, native))
        return self.ln_2(x + mlp.forward_cached(x, linear))


class CharTransformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # GPT-2 has a final LayerNorm before the head; the post-LN seed block ends normalised.
        self.ln_f: nn.Module = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.block == "gpt2" else nn.Identity()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def inference_linears(self) -> InferenceLinears:
        """Every linear layer and the (tied) head, for ``forward_cached``; see ``InferenceLinears``."""
        linears = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        return InferenceLinears([*linears, self.tok_emb.weight])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab). The head is the token embedding (tied)."""
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds the context window of {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight)  # (B, T, vocab)

    def forward_cached(
        self, idx: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, linear: Linear = F.linear, native: bool | None = None
    ) -> torch.Tensor:
        """Incremental forward with a KV cache (inference: no dropout, no autograd wanted).

        idx (B, T) token ids at absolute positions pos (B, T) (each < block_size); cache
        (n_layer, 2, B, nh, L, hs), a view into preallocated memory whose row b holds sequence b's
        keys and values at positions 0..L-1. The new tokens' keys and values are written into the
        cache at ``pos``, then each token attends to the cached positions <= its own, so cells past
        a sequence's length (stale or unwritten) are masked out. Returns logits (B, T, vocab), equal
        (to float tolerance) to ``forward`` over the whole sequence. ``linear`` computes every linear
        layer and the head: ``F.linear``, or this model's ``inference_linears()`` (faster). ``native``:
        decode steps' attention through the compiled kernel (``_attend``); None decides as serving does
        (``decode_attention_native``).
        """
        if native is None:
            native = decode_attention_native(self.tok_emb.weight)
        b = idx.shape[0]
        span = cache.shape[-2]
        # (B, 1, T, L) additive mask: query t of row b sees cached positions 0..pos[b, t] (causal, per
        # sequence). Built once for all layers, as floats: SDPA would convert a boolean mask per call.
        hidden = (torch.arange(span, device=idx.device) > pos.unsqueeze(-1)).unsqueeze(1)
        mask = torch.zeros(hidden.shape, dtype=self.tok_emb.weight.dtype, device=idx.device).masked_fill_(hidden, -math.inf)
        where = (torch.arange(b, device=idx.device).unsqueeze(1), pos)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for block, kv in zip(self.blocks, cache, strict=True):
            x = cast(Block, block).forward_cached(x, kv, where, mask, linear, native)  # kv: (2, B, nh, L, hs)
        return linear(self.ln_f(x), self.tok_emb.weight, None)  # (B, T, vocab)


KIND = Kind(
    "char-transformer",
    "character-level decoder-only Transformer",
    TransformerConfig,
    CharTransformer,
    Shape.TOKEN_DECODE,
    trainer="training.transformer:TransformerTask",
    command="transformer",
    figures="training.transformer:evaluation_figures",
)
