"""engine.kernels: the compiled decode attention agrees with torch's, row by row, and refuses bad input by name."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels import ENV_SWITCH, append_kv_reference, decode_attention_reference, native_decode_attention

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def native() -> None:
    """The compiled kernel. CI's machine has a compiler, so there a missing build fails instead of skipping."""
    if not native_decode_attention():
        if os.environ.get("CI"):
            pytest.fail("engine.kernels could not build decode_attention on CI's machine (see the engine.kernels log line)")
        pytest.skip("no native build here (no C++ compiler or ninja)")


def cache_views(
    batch: int, heads: int, span: int, head_size: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, nh, 1, hs) strided as the graph's, and k, v as slices of a larger slotted cache (B, nh, span, hs)."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, batch + 3, heads, span + 5, head_size, generator=gen).to(dtype)
    qkv = torch.randn(batch, 1, 3, heads, head_size, generator=gen)
    return qkv[:, :, 0].transpose(1, 2), cache[0, :batch, :, :span], cache[1, :batch, :, :span]


@pytest.mark.parametrize(
    ("batch", "heads", "span", "head_size"), [(1, 1, 1, 1), (3, 4, 17, 48), (32, 4, 116, 48), (5, 6, 128, 64), (2, 2, 9, 7)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32 cache", "float16 cache"])
def test_native_decode_attention_equals_torch_attention_to_rounding(
    native: None, batch: int, heads: int, span: int, head_size: int, dtype: torch.dtype
) -> None:
    """Over float32 and float16 caches (--decode-precision int8's), head sizes a multiple of 8 and not."""
    q, k, v = cache_views(batch, heads, span, head_size, seed=span, dtype=dtype)
    lengths = torch.randint(1, span + 1, (batch,), generator=torch.Generator().manual_seed(1))
    lengths[0] = span
    scale = 1 / math.sqrt(head_size)
    with torch.inference_mode():
        got = torch.ops.genserve.decode_attention(q, k, v, lengths, scale)
        want = decode_attention_reference(q, k, v, lengths, scale)
    assert got.shape == (batch, heads, 1, head_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_rows_result_depends_on_its_own_cells_only_bit_for_bit(native: None) -> None:
    """The batch's longest context, the neighbours and the stale cells past a row's length change nothing."""
    q, k, v = cache_views(8, 4, 60, 48, seed=3)
    lengths = torch.tensor([60, 5, 33, 1, 59, 12, 60, 40])
    scale = 0.125
    with torch.inference_mode():
        together = torch.ops.genserve.decode_attention(q, k, v, lengths, scale)
        for b in range(8):
            n = int(lengths[b])
            alone = torch.ops.genserve.decode_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], lengths[b : b + 1], scale)
            assert torch.equal(alone, together[b : b + 1])
        k[:, :, 41:] = float("nan")  # stale cells past every row's length but the full ones
        lengths[[0, 4, 6]] = 41
        shorter = torch.ops.genserve.decode_attention(q, k, v, lengths, scale)
    assert not shorter.isnan().any()


@pytest.mark.parametrize(
    ("length", "message"), [(0, r"length 0 of sequence 1 outside 1\.\.10"), (11, r"length 11 of sequence 1 outside 1\.\.10")]
)
def test_native_decode_attention_refuses_a_length_outside_the_cache(native: None, length: int, message: str) -> None:
    q, k, v = cache_views(2, 2, 10, 8, seed=0)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.genserve.decode_attention(q, k, v, torch.tensor([3, length]), 0.5)


def test_native_append_kv_writes_exactly_the_cells_torch_indexing_writes(native: None) -> None:
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(2, 7, 4, 20, 48, generator=gen)
    fresh = torch.randn(5, 1, 3, 4, 48, generator=gen)[:, 0, 1:]  # (B, 2, nh, hs), strided as the graph's qkv[:, 0, 1:]
    positions = torch.tensor([0, 19, 3, 3, 11])
    got, want = cache.clone(), cache.clone()
    with torch.inference_mode():
        torch.ops.genserve.append_kv(got[:, :5, :, :17], fresh, positions.clamp(max=16))  # a slice of the cache, as a step's
        append_kv_reference(want[:, :5, :, :17], fresh, positions.clamp(max=16))
    assert torch.equal(got, want) and not torch.equal(got, cache)
    half = cache.half()
    with torch.inference_mode():
        torch.ops.genserve.append_kv(half[:, :5], fresh, positions.clamp(max=16))
    assert torch.equal(half, want.half())  # a float16 cache gets the values rounded to float16


def test_native_append_kv_refuses_a_position_outside_the_cache(native: None) -> None:
    with pytest.raises(RuntimeError, match=r"position 9 of sequence 1 outside 0\.\.8"):
        torch.ops.genserve.append_kv(torch.zeros(2, 2, 1, 9, 4), torch.zeros(2, 2, 1, 4), torch.tensor([0, 9]))


def test_the_switch_turns_the_native_kernel_off_and_the_log_says_why() -> None:
    code = "import engine.kernels as k; print('native', k.native_decode_attention())"
    env = {**os.environ, ENV_SWITCH: "0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert "native False" in out.stdout
    assert "torch fallback" in out.stdout + out.stderr and f"{ENV_SWITCH}=0" in out.stdout + out.stderr
