"""Sampling (engine/sampling.py): draws follow the top-k/top-p filtered distribution, greedy rows take
the argmax, and every bad setting is refused with its own message."""

from __future__ import annotations

import math

import pytest
import torch

from engine.errors import InvalidRequestError, InvalidSamplingError
from engine.sampling import SamplingBatch, SamplingParams, sample


@pytest.mark.parametrize(("top_k", "top_p", "kept"), [(0, 1.0, 5), (3, 1.0, 3), (0, 0.7, 2), (4, 0.99, 4)])
def test_sample_matches_the_filtered_distribution(top_k: int, top_p: float, kept: int) -> None:
    logits = torch.tensor([1.0, 3.0, -1.0, 2.5, 0.5])
    temperature = 0.8
    probs = torch.softmax(logits / temperature, dim=0)
    order = probs.argsort(descending=True)
    expected = torch.zeros(5)
    expected[order[:kept]] = probs[order[:kept]] / probs[order[:kept]].sum()
    n = 40_000
    batch = SamplingBatch.build([SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * n, vocab_size=5)
    ids = sample(logits.expand(n, 5), batch, torch.rand(n, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(ids, minlength=5) / n
    torch.testing.assert_close(freq, expected, atol=0.012, rtol=0)
    assert int((freq > 0).sum()) == kept


def test_greedy_rows_take_argmax_among_sampled_rows() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 1.0]])
    batch = SamplingBatch.build([SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1)], vocab_size=3)
    assert sample(logits, batch, torch.tensor([0.99, 0.5])).tolist() == [1, 0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number >= 0 (0 means greedy), got nan"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0 (0 means greedy), got -0.5"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0 (0 means greedy), got inf"),
        ({"top_p": 0.0}, "top_p must be in (0, 1] (1 turns it off), got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1] (1 turns it off), got 1.5"),
        ({"top_p": math.nan}, "top_p must be in (0, 1] (1 turns it off), got nan"),
        ({"top_k": -1}, "top_k must be an integer >= 0 (0 turns it off), got -1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer between 1 and 4096, got 0"),
        ({"max_new_tokens": 4097}, "max_new_tokens must be an integer between 1 and 4096, got 4097"),
        ({"seed": -1}, "seed must be an integer in [0, 2**64), got -1"),
        ({"stop": ("ok", "")}, "stop string 1 must be a non-empty string, got ''"),
        ({"stop": "\n"}, "stop must be a sequence of strings, not a string: '\\n'"),
        ({"stop": ("x" * 65,)}, "stop string 0 has 65 characters; the limit is 64"),
    ],
)
def test_bad_settings_raise_precise_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSamplingError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert isinstance(info.value, InvalidRequestError) and isinstance(info.value, ValueError)
