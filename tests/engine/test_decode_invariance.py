"""Batch invariance of the decode loop: with ``batch_invariant=True`` a sequence's logits, step by
step, are bit for bit those it gets alone, whatever shares its batch; by default they agree to float rounding.

The logits are caught where the loop hands them to ``sample`` (row i belongs to active slot i), so
the comparison is on the numbers, not only on the text (which a difference of 1e-7 rarely changes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.decode as decode
from engine.decode import DecodeBatch, SequenceRequest, TokenEvent
from engine.modelfile import load_model
from engine.models.transformer import CharTransformer, TransformerConfig
from engine.sampling import SamplingBatch, SamplingParams, sample
from tests.paths import ROOT

VOCAB = "\n abcdefghij"
BUNDLED = ROOT / "models" / "transformer.safetensors"


def tiny_model(block_size: int = 16) -> CharTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=len(VOCAB), block_size=block_size, n_layer=2, n_head=2, d_model=16, d_ff=32, dropout=0.0)
    return CharTransformer(cfg).eval()


@contextmanager
def logits_by_sequence(loop: DecodeBatch, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Each sequence's logits row at every step (by handle id), as the loop samples from them."""
    rows: dict[int, list[torch.Tensor]] = {}
    original = sample

    def catching(logits: torch.Tensor, batch: SamplingBatch, uniforms: torch.Tensor) -> torch.Tensor:
        for i, seq in enumerate(loop._active):
            rows.setdefault(seq.handle.id, []).append(logits[i].clone())
        return original(logits, batch, uniforms)

    with monkeypatch.context() as m:
        m.setattr(decode, "sample", catching)
        yield rows


def run(
    loop: DecodeBatch,
    target: SequenceRequest,
    others: list[tuple[int, SequenceRequest]],
    monkeypatch: pytest.MonkeyPatch,
    target_at: int = 0,
) -> tuple[str, list[torch.Tensor]]:
    """Decode ``target``, added before step ``target_at``, among ``others``: (the step before which it is added, request)."""
    events: list[TokenEvent] = []
    with logits_by_sequence(loop, monkeypatch) as rows:
        joins = sorted(others, key=lambda o: o[0])
        step = 0
        handle = None
        while joins or handle is None or loop.has_work:
            while joins and joins[0][0] <= step:
                loop.add(joins.pop(0)[1])
            if handle is None and step >= target_at:
                handle = loop.add(target)
            events += loop.step()
            step += 1
    assert handle is not None
    text = "".join(e.text for e in events if e.handle == handle)
    return text, rows[handle.id]


requests = st.builds(
    SequenceRequest,
    prompt=st.text(alphabet=VOCAB, min_size=1, max_size=24),  # past the 16-token window: truncation and crops
    params=st.builds(
        SamplingParams,
        temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
        top_k=st.sampled_from([0, 3]),
        top_p=st.sampled_from([1.0, 0.9]),
        seed=st.integers(0, 2**63),
        max_new_tokens=st.integers(1, 30),
    ),
)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=requests,
    target_at=st.integers(0, 4),
    others=st.lists(st.tuples(st.integers(0, 4), requests), max_size=6),  # often prefilled in the target's step
    max_batch=st.sampled_from([3, 4, 8]),
)
def test_batch_invariant_loop_gives_each_sequence_its_alone_logits_bit_for_bit(
    target: SequenceRequest, target_at: int, others: list[tuple[int, SequenceRequest]], max_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model()
    alone_text, alone = run(DecodeBatch(model, VOCAB, max_batch=max_batch, batch_invariant=True), target, [], monkeypatch)
    loop = DecodeBatch(model, VOCAB, max_batch=max_batch, max_pending=len(others) + 1, batch_invariant=True)
    text, batched = run(loop, target, others, monkeypatch, target_at)
    assert text == alone_text
    assert len(batched) == len(alone)
    for step, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert torch.equal(a, b), f"step {step}: max |d| {(a - b).abs().max().item():.3g}"


def test_batch_invariant_bundled_model_in_a_full_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real model's sizes (its kernels block differently from the tiny one's), 16 neighbours joining mid-flight."""
    loaded = load_model(BUNDLED)
    target = SequenceRequest("ROMEO:\n", SamplingParams(temperature=0.9, top_k=20, seed=7, max_new_tokens=40))
    prompts = ["First Citizen:\n"[: 3 + k] for k in range(16)]
    others = [(k % 5, SequenceRequest(p, SamplingParams(seed=k, max_new_tokens=10 + 3 * k))) for k, p in enumerate(prompts)]
    alone_text, alone = run(DecodeBatch.from_loaded(loaded, max_batch=8, batch_invariant=True), target, [], monkeypatch)
    loop = DecodeBatch.from_loaded(loaded, max_batch=8, max_pending=32, batch_invariant=True)
    text, batched = run(loop, target, others, monkeypatch, target_at=2)
    assert text == alone_text and len(alone_text) == 40
    assert all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))


def test_default_loop_agrees_with_alone_to_float_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without batch_invariant, kernels block by batch size and span: equal to rounding, not bit for bit (greedy, so
    the tokens, and hence the inputs of every step, stay the same)."""
    loaded = load_model(BUNDLED)
    target = SequenceRequest("ROMEO:\n", SamplingParams(temperature=0, max_new_tokens=30))
    others = [(k % 3, SequenceRequest("KING:\n"[: 2 + k % 4], SamplingParams(temperature=0, max_new_tokens=20 + k))) for k in range(10)]
    _, alone = run(DecodeBatch.from_loaded(loaded, max_batch=8), target, [], monkeypatch)
    _, batched = run(DecodeBatch.from_loaded(loaded, max_batch=8, max_pending=16), target, others, monkeypatch, target_at=1)
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_work_counters_stop_for_a_cancelled_sequence() -> None:
    """A cancelled sequence leaves at the next step: no token is sampled for it after that (a run of minutes, cut short)."""
    loop = DecodeBatch(tiny_model(), VOCAB, max_batch=2)
    long = loop.add(SequenceRequest("abc", SamplingParams(temperature=1.0, seed=1, max_new_tokens=4096)))
    for _ in range(3):
        loop.step()
    assert loop.tokens_sampled == 3 and loop.forward_passes == 3  # one prefill, two decode passes
    loop.cancel(long)
    events = loop.step()
    assert [(e.handle, e.finish_reason) for e in events] == [(long, "cancelled")]
    assert loop.tokens_sampled == 3 and loop.forward_passes == 3 and not loop.has_work
