"""Per-sequence sampling settings, their validation, and batched sampling that keeps sequences independent.

Every setting is per sequence. A decode step samples all active sequences at once from one
(B, vocab) logits tensor, but each row's result depends only on that row's logits, settings and
random numbers: the random numbers come from the sequence's own ``torch.Generator`` (seeded per
request), and the maths (temperature, top-k, top-p, inverse-CDF draw) is row-wise. So a request's
output does not depend on which other requests share its batch.

Errors: ``InvalidRequestError`` (a ``ValueError``) and its subclasses mean the request itself is
wrong; the server maps them to INVALID_ARGUMENT. Messages name the field and the offending value.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.errors import InvalidSamplingError

MIN_TEMPERATURE = 1e-6  # smaller temperatures decode greedily (their limit), so the division cannot overflow
MAX_NEW_TOKENS = 4096  # hard cap per request; a DecodeBatch may set a lower one
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 64  # characters per stop string
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64
_UNIFORM_CHUNK = 64  # random numbers drawn from a sequence's generator at a time


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_max_new_tokens(value: object, cap: int) -> None:
    if not _is_int(value) or not 1 <= value <= cap:  # type: ignore[operator]
        raise InvalidSamplingError(f"max_new_tokens must be an integer between 1 and {cap}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled; validated on construction (raises InvalidSamplingError).

    temperature: 0 means greedy (argmax), else logits are divided by it; below 1e-6 it is greedy too.
    top_k: keep the k most likely tokens (0 = off). top_p: keep the smallest set of most likely
    tokens whose probability reaches top_p (nucleus sampling; 1 = off); applied after top-k.
    seed: seeds this sequence's own generator; None draws one (``SequenceHandle.seed`` reports it).
    max_new_tokens: the sequence ends with reason "length" after this many tokens.
    stop: the sequence ends with reason "stop" when its generated text (not the prompt) contains one
    of these strings; the stop string and anything after it are not emitted.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidSamplingError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidSamplingError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        p = self.top_p
        if not _is_number(p) or not 0 < p <= 1:  # NaN fails both comparisons
            raise InvalidSamplingError(f"top_p must be in (0, 1] (1 turns it off), got {p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise InvalidSamplingError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        check_max_new_tokens(self.max_new_tokens, MAX_NEW_TOKENS)
        stop: object = self.stop  # typed as a tuple, but callers may pass anything
        if isinstance(stop, str):  # a bare string would silently become one stop string per character
            raise InvalidSamplingError(f"stop must be a sequence of strings, not a string: {stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidSamplingError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InvalidSamplingError(f"stop string {i} must be a non-empty string, got {s!r}")
            if len(s) > MAX_STOP_LENGTH:
                raise InvalidSamplingError(f"stop string {i} has {len(s)} characters; the limit is {MAX_STOP_LENGTH}")

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE sampling is greedy, its limit: logits / 1e-40 overflow float32 to
        # inf, and softmax of inf is NaN (a bad-input test found this crashing the decode loop).
        return self.temperature < MIN_TEMPERATURE


class UniformStream:
    """A sequence's own random numbers in [0, 1): one per sampled token, from a generator seeded by the request.

    Drawn in chunks so that a decode step needs no per-sequence tensor call; the stream depends on
    the seed alone, never on batch neighbours.
    """

    def __init__(self, seed: int) -> None:
        self._gen = torch.Generator().manual_seed(seed)
        self._buf: list[float] = []
        self._next = 0

    def next(self) -> float:
        if self._next == len(self._buf):
            self._buf = torch.rand(_UNIFORM_CHUNK, generator=self._gen).tolist()  # float32, exact as floats
            self._next = 0
        u = self._buf[self._next]
        self._next += 1
        return u


def draw_seed() -> int:
    return secrets.randbits(63)


@dataclass(frozen=True)
class SamplingBatch:
    """Row-wise sampling settings of a batch as tensors; rebuilt only when the batch's membership changes.

    temperature (B,) with greedy rows set to 1 (their sampled value is discarded); top_k (B,) with
    0 replaced by vocab (no-op); top_p (B,) with 1 replaced by +inf so that float rounding in the
    cumulative sum never trims a token from a sequence that turned top-p off.
    """

    greedy: torch.Tensor  # (B,) bool
    temperature: torch.Tensor  # (B, 1)
    top_k: torch.Tensor  # (B, 1) long
    top_p: torch.Tensor  # (B, 1)
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str = "cpu") -> SamplingBatch:
        greedy = [p.greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_p = [p.top_p if p.top_p < 1 else math.inf for p in params]
        return cls(
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device).unsqueeze(1),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device).unsqueeze(1),
            top_p=torch.tensor(top_p, device=device).unsqueeze(1),
            all_greedy=all(greedy),
            any_top_k=any(k < vocab_size for k in top_k),
            any_top_p=any(math.isfinite(p) for p in top_p),
        )


def sample(logits: torch.Tensor, batch: SamplingBatch, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids (B,) from logits (B, V), per-row settings and per-row uniforms (B,) in [0, 1).

    Inverse-CDF sampling over the tokens sorted by probability: the draw for row b is the first
    token whose cumulative (filtered) probability exceeds u_b times the row's total, which is the
    same distribution as ``torch.multinomial`` but takes its randomness from the row's own stream.
    """
    greedy_ids = logits.argmax(dim=-1)  # (B,)
    if batch.all_greedy:
        return greedy_ids
    scaled = logits / batch.temperature  # (B, V)
    # stable: equal logits keep vocabulary order, so ties break the same way in every batch
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)  # (B, V) each
    if batch.any_top_k:
        ranks = torch.arange(logits.shape[-1], device=logits.device)  # (V,)
        sorted_logits = sorted_logits.masked_fill(ranks >= batch.top_k, -math.inf)
    probs = torch.softmax(sorted_logits, dim=-1)  # (B, V), renormalised over the top-k
    if batch.any_top_p:
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= batch.top_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    # Kept tokens are a prefix of the sorted order; rounding in u * total must not step past it.
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1  # (B, 1)
    choice = torch.minimum(torch.searchsorted(cdf, target, right=True), last_kept)  # (B, 1)
    sampled = order.gather(-1, choice).squeeze(1)  # (B,)
    return torch.where(batch.greedy, greedy_ids, sampled)
