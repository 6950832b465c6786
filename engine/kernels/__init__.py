"""Native kernels: C++ compiled on first use by this machine's compiler, each with a torch fallback.

``genserve::decode_attention(q, k, v, lengths, scale)``: attention for one new token per sequence
(q (B, heads, 1, head_size)) over the first ``lengths[b]`` cached positions of its own keys and
values (k, v (B, heads, L, head_size), rows contiguous; float32, or float16 for a float16 cache). The decode step's attention: torch's CPU
attention kernels spend 3-4x longer on these one-row queries once the cache outgrows the CPU's
cache (docs/design/decode-loop.md). ``genserve::append_kv(kv, fresh, positions)``: a decode step's new
keys and values into the cache, one position per sequence (torch's generic indexing took 5% of a step).

``native_decode_attention()`` says whether the compiled kernel is in use. It compiles
``decode_attention.cpp`` once per machine (about 10 s; torch caches the build under
``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``; built for this CPU, ``-march=native``,
so machines of different CPUs sharing a home directory need a ``TORCH_EXTENSIONS_DIR`` each), and is False, with one log line saying
why, where it cannot: no C++ compiler or ninja, a torch without its headers, or
``GENSERVE_NATIVE_KERNELS=0``. The ops always exist: without the native build they run
``decode_attention_reference`` (torch's attention with a length mask) and ``append_kv_reference``,
which are also what the tests compare the kernels with.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.logs import get_logger

log = get_logger("engine.kernels")

SOURCE = Path(__file__).with_name("decode_attention.cpp")
ENV_SWITCH = "GENSERVE_NATIVE_KERNELS"  # "0" turns the native kernels off
_SCHEMAS = (
    "decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor",
    "append_kv(Tensor(a!) kv, Tensor fresh, Tensor positions) -> ()",
)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """What ``genserve::decode_attention`` computes, with torch's attention and an additive mask."""
    hidden = torch.arange(k.size(-2), device=k.device) >= lengths.view(-1, 1, 1, 1)  # (B, 1, 1, L)
    mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, -math.inf)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)


def append_kv_reference(kv: torch.Tensor, fresh: torch.Tensor, positions: torch.Tensor) -> None:
    """What ``genserve::append_kv`` does: ``kv[:, b, :, positions[b]] = fresh[b]`` for each sequence b
    (kv (2, B, heads, L, head_size), fresh (B, 2, heads, head_size), positions (B,))."""
    kv[:, torch.arange(kv.size(1), device=kv.device), :, positions] = fresh.to(kv.dtype)


_library = torch.library.Library("genserve", "DEF")  # the ops: their schemas, and the torch fallbacks
for _schema in _SCHEMAS:
    _library.define(_schema)
_library.impl("decode_attention", decode_attention_reference, "CompositeExplicitAutograd")
_library.impl("append_kv", append_kv_reference, "CompositeExplicitAutograd")
_lock = threading.Lock()


@functools.cache
def _load_native() -> str | None:
    """Compile and load the kernel; None on success, else why not (one line)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return f"{ENV_SWITCH}=0"
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        cpp_extension.load(
            name="genserve_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],  # fast-math: vectorised expf
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: the torch fallback computes the same
        first = str(e).strip().splitlines()
        return f"{type(e).__name__}: {first[0] if first else 'no message'}"[:300]
    return None


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a venv's (the ``ninja`` package of the ``[server]`` extra) is not on it
    unless the venv is activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # torch's own check then says that ninja is missing
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def native_decode_attention() -> bool:
    """Whether ``genserve::decode_attention`` runs the compiled kernel (compiling it on first call)."""
    with _lock:  # one compile per process even when two decode threads start together
        first = _load_native.cache_info().currsize == 0
        why_not = _load_native()
    if first:
        if why_not is None:
            log.info("native_kernels", decode_attention="compiled", source=str(SOURCE))
        else:
            log.warning("native_kernels", decode_attention="torch fallback", reason=why_not)
    return why_not is None
