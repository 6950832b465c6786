"""Text generation for ``CharTransformer``: a slotted KV cache and a continuous-batching decode loop.

Synchronous by design: the engine runs one ``DecodeBatch`` per model version on its own thread
(``DecodeThread``, engine/engine.py) and calls ``step()`` in a loop; ``add()`` and ``cancel()`` may
be called from any thread.

KV cache. One preallocated tensor, (n_layer, 2, max_batch, n_head, block_size, head_dim), zeroed
once and never reallocated; a sequence occupies one slot. Active sequences stay dense in slots
0..n-1 (a leaving one's slot gets the last one's rows), so a step works on the plain slice
``kv[:, :, :n, :, :L]``, L the longest active context, with a mask hiding each slot's cells beyond
its own length.

Scheduling (vLLM's iteration-level scheduling). ``step()`` applies cancellations, admits waiting
sequences into free slots and prefills them (which yields their first token), and advances every
other active sequence by one token in ONE batched forward pass: one token per active sequence per
step. A finished sequence frees its slot at the end of the step, a cancelled one at the start of
the next. At most ``max_batch`` decode and ``max_pending`` wait (FIFO); beyond that ``add()``
raises ``QueueFullError`` at once (the server maps it to RESOURCE_EXHAUSTED).

Context policy. Positions 0..block_size-1 are learned: a full cache re-prefills its last
``block_size // 2`` tokens at positions 0.. and continues (nanoGPT's crop, paid once every
block_size // 2 tokens); a longer prompt keeps its last block_size characters
(``SequenceHandle.truncated_chars``), each still checked against the vocabulary; an empty prompt
is refused (send "\\n" to start from a line break).

Determinism. A request's text depends only on its prompt and settings (its seed included);
sampling is row-wise with per-sequence generators (``engine.sampling``). Its logits:
- default: equal to what it would get alone to float rounding (~1e-7: matrix kernels round by row
  count, and attention spans the batch's longest context), so a token can change only where its
  draw falls that close to a boundary.
- ``batch_invariant=True``: bit for bit. Every decode pass runs all ``max_batch`` slots over the
  whole window and every prefill runs alone, so a sequence's text depends only on its prompt,
  settings and seed, the batch's ``max_batch`` and the machine (CPU kernels, torch threads). Fewer
  tokens a second, hence off by default.

Work counters: ``forward_passes`` and ``tokens_sampled`` (one per active sequence per step) only
grow; a cancelled sequence stops adding to them at the next step.

Why, and the figures: docs/design/decode-loop.md
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.errors import InvalidPromptError, QueueFullError
from engine.kinds import Shape
from engine.modelfile import LoadedModel
from engine.models.transformer import CharTransformer, DecodePrecision, cached_forward
from engine.sampling import (
    MAX_NEW_TOKENS,
    SamplingBatch,
    SamplingParams,
    UniformStream,
    check_max_new_tokens,
    draw_seed,
    sample,
)

FinishReason = Literal["length", "stop", "cancelled"]


class Vocabulary:
    """Character-level tokeniser: token id = index of the character in the model's vocab string."""

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise ValueError("a vocabulary is a non-empty string of distinct characters")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; InvalidPromptError names the first character outside the vocabulary."""
        if not isinstance(text, str):
            raise InvalidPromptError(f"prompt must be a string, got {type(text).__name__}")
        if not text:
            raise InvalidPromptError('prompt is empty: the model needs at least one character to condition on (send "\\n" to start afresh)')
        try:
            return [self._index[c] for c in text]
        except KeyError:
            pos, ch = next((i, c) for i, c in enumerate(text) if c not in self._index)
            raise InvalidPromptError(f"prompt character {ch!r} at position {pos} is not in the model's vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class SlotCache:
    """A ``CharTransformer`` with its preallocated KV cache of ``max_batch`` slots."""

    def __init__(self, model: CharTransformer, max_batch: int, precision: DecodePrecision = "float32") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cfg = model.config
        param = next(model.parameters())
        self.model = model.eval()  # dropout off; the cached path never applies it anyway
        # The model's cached forward: one TorchScript graph (the GIL released once per forward, not per
        # op: the decode thread runs beside the event loop; docs/design/decode-loop.md),
        # bit for bit the eager forward with weights (in, out) (InferenceLinears: faster sgemm).
        self.forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = cached_forward(model, precision)
        self.device = param.device
        self.max_batch = max_batch
        self.block_size = cfg.block_size
        self.vocab_size = cfg.vocab_size
        # A normal tensor, not an inference tensor: written in place under inference mode, readable anywhere.
        # Zeroed, not empty: masked cells get weight 0, but 0 * NaN from uninitialised memory would be NaN.
        # int8 decoding keeps its cache in float16: half the memory a step reads (docs/design/decode-loop.md)
        dtype = torch.float16 if precision == "int8" else param.dtype
        self.kv = torch.zeros(  # (n_layer, 2, max_batch, nh, block_size, hs)
            cfg.n_layer, 2, max_batch, cfg.n_head, cfg.block_size, cfg.d_model // cfg.n_head, dtype=dtype, device=param.device
        )

    def prefill(self, slots: Sequence[int], windows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Write each window (1..block_size tokens) into its slot at positions 0..; logits (B, T, vocab).

        One forward pass for all windows, right-padded to the longest (T): a padding token sits
        after its row's real tokens, so no real token attends to it, and its cache cells lie past
        the row's length, where the decode mask hides them until they are overwritten. Logits at
        padded positions are meaningless.
        """
        lengths = [len(w) for w in windows]
        if not slots or len(slots) != len(windows) or not all(1 <= n <= self.block_size for n in lengths):
            raise ValueError(
                f"prefill takes one window of 1 to {self.block_size} tokens per slot, got lengths {lengths} for slots {list(slots)}"
            )
        b, t = len(slots), max(lengths)
        with torch.inference_mode():
            idx = torch.tensor([[*w, *[0] * (t - len(w))] for w in windows], device=self.device)  # (B, T)
            pos = torch.arange(t, device=self.device).expand(b, t)  # (B, T)
            first = slots[0]
            if list(slots) == list(range(first, first + b)):  # adjacent slots: write in place
                return self.forward(idx, pos, self.kv[:, :, first : first + b, :, :t])
            # Scattered slots: a prefill reads only cells it writes first, so run it on scratch and copy in.
            kv = self.kv
            scratch = kv.new_empty(kv.shape[0], kv.shape[1], b, kv.shape[3], t, kv.shape[5])  # (n_layer, 2, B, nh, T, hs)
            logits = self.forward(idx, pos, scratch)
            kv[:, :, list(slots), :, :t] = scratch
            return logits

    def decode(self, ids: Sequence[int], positions: Sequence[int], *, fixed_shape: bool = False) -> torch.Tensor:
        """One token for each of slots 0..n-1: ``ids[b]`` at ``positions[b]``; logits (n, vocab).

        ``fixed_shape``: run every slot (idle ones on a dummy token at position 0, a cell their next
        prefill overwrites) over the whole window, so that the pass has the same shapes whatever the
        batch, and each row the same kernel path (see ``DecodeBatch``'s batch_invariant).
        """
        n = len(ids)
        if fixed_shape:
            pad = self.max_batch - n
            ids, positions, rows, span = [*ids, *[0] * pad], [*positions, *[0] * pad], self.max_batch, self.block_size
        else:
            rows, span = n, max(positions) + 1  # attend over the longest context only, not the whole window
        with torch.inference_mode():
            idx = torch.tensor(ids, device=self.device).unsqueeze(1)  # (rows, 1)
            pos = torch.tensor(positions, device=self.device).unsqueeze(1)  # (rows, 1)
            return self.forward(idx, pos, self.kv[:, :, :rows, :, :span])[:n, 0]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst``."""
        with torch.inference_mode():
            self.kv[:, :, dst, :, :length].copy_(self.kv[:, :, src, :, :length])


@dataclass(frozen=True)
class SequenceRequest:
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""  # carried into events and logs only


@dataclass(frozen=True)
class SequenceHandle:
    """Names a sequence in a DecodeBatch; ``seed`` is the one used (drawn when the request gave none)."""

    id: int
    request_id: str
    seed: int
    prompt_tokens: int  # after truncation
    truncated_chars: int  # dropped from the front of a prompt longer than the context window


@dataclass(frozen=True)
class TokenEvent:
    """One sequence's result of one step: new text (possibly empty while a stop string is undecided)."""

    handle: SequenceHandle
    text: str
    token_id: int | None  # None for a cancellation
    n_generated: int  # tokens sampled so far, this one included
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopMatcher:
    """Withholds text that could be the start of a stop string until it is decided.

    Invariant: the held text is the longest suffix of the generated text that is a proper prefix
    of some stop string, so a stop string, even one spanning many tokens, always lies inside
    held + new piece when it completes, and nothing of it has been emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string completed)."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        hold = 0
        for k in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                hold = k
                break
        self.held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass(eq=False)
class _Sequence:
    handle: SequenceHandle
    params: SamplingParams
    tokens: list[int]  # prompt (truncated) + generated; tokens[-1] is fed next unless prefilling
    stops: StopMatcher
    uniforms: UniformStream | None  # None for greedy sequences
    ctx_len: int = 0  # tokens in the slot's cache; 0 = not yet prefilled
    generated: int = 0


class DecodeBatch:
    """Continuous batching over one model: ``add`` sequences, call ``step`` until they finish.

    >>> batch = DecodeBatch.from_loaded(load_model("models/transformer.safetensors"), max_batch=8)
    >>> h = batch.add(SequenceRequest("ROMEO:", SamplingParams(temperature=0.8, seed=1, max_new_tokens=50)))
    >>> while batch.has_work: events = batch.step()
    """

    def __init__(
        self,
        model: CharTransformer,
        vocab: str,
        *,
        max_batch: int = 32,
        max_pending: int = 64,
        max_new_tokens_cap: int = MAX_NEW_TOKENS,
        batch_invariant: bool = False,
        precision: DecodePrecision = "float32",
    ) -> None:
        if len(vocab) != model.config.vocab_size:
            raise ValueError(f"vocab has {len(vocab)} characters but the model's vocab_size is {model.config.vocab_size}")
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        if not 1 <= max_new_tokens_cap <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens_cap must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens_cap}")
        self.vocab = Vocabulary(vocab)
        self._cache = SlotCache(model, max_batch, precision)
        self.block_size = model.config.block_size
        self.keep = max(1, self.block_size // 2)  # tokens kept when a full context is re-prefilled
        self.max_pending = max_pending
        self.max_new_tokens_cap = max_new_tokens_cap
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _pending, _live, _cancelled (touched by add/cancel threads)
        self._step_lock = threading.Lock()  # step() is single-threaded; a concurrent call is a bug
        self._pending: deque[_Sequence] = deque()
        self._live: dict[int, _Sequence] = {}  # pending or active, by handle id
        self._cancelled: set[int] = set()
        self._active: list[_Sequence] = []  # index = slot (owned by the stepping thread)
        self._batch: SamplingBatch | None = None  # settings tensors for _active's order; None = rebuild
        self.batch_invariant = batch_invariant
        # Work done, for tests and metrics: forward passes run, and tokens sampled (one per active
        # sequence per step). A cancelled sequence stops adding to ``tokens_sampled`` at the next step.
        self.forward_passes = 0
        self.tokens_sampled = 0

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **kwargs: int | bool | str) -> DecodeBatch:
        if loaded.spec.shape is not Shape.TOKEN_DECODE or loaded.vocab is None:
            raise ValueError(f"{loaded.path}: a {loaded.kind} is not a text model")
        return cls(loaded.module, loaded.vocab, **kwargs)  # type: ignore[arg-type]

    # -- counts ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Sequences that can decode at once (slots)."""
        return self._cache.max_batch

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def has_work(self) -> bool:
        """Whether ``step()`` has anything to do (active, waiting or cancelled sequences)."""
        return bool(self._live or self._active)

    # -- requests (any thread) -------------------------------------------------------------

    def add(self, request: SequenceRequest) -> SequenceHandle:
        """Queue a sequence; it joins the batch at the next step with a free slot.

        Raises InvalidRequestError (bad prompt or settings) or QueueFullError (no room).
        """
        params = request.params
        check_max_new_tokens(params.max_new_tokens, self.max_new_tokens_cap)
        ids = self.vocab.encode(request.prompt)
        truncated = max(0, len(ids) - self.block_size)
        ids = ids[truncated:]
        seed = params.seed if params.seed is not None else draw_seed()
        with self._lock:
            if len(self._live) >= self.capacity + self.max_pending:
                raise QueueFullError(f"decode loop is full: {self.capacity} sequences decoding and {self.max_pending} waiting")
            handle = SequenceHandle(next(self._ids), request.request_id, seed, len(ids), truncated)
            seq = _Sequence(handle, params, ids, StopMatcher(params.stop), None if params.greedy else UniformStream(seed))
            self._live[handle.id] = seq
            self._pending.append(seq)
        return handle

    def cancel(self, handle: SequenceHandle) -> bool:
        """Ask the sequence to leave at the next step; False if it already finished (or is unknown)."""
        with self._lock:
            if handle.id not in self._live:
                return False
            self._cancelled.add(handle.id)
            return True

    # -- stepping (one thread) -------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Apply cancellations, admit waiting sequences, and advance every active sequence by one token."""
        if not self._step_lock.acquire(blocking=False):
            raise RuntimeError("DecodeBatch.step() called concurrently; one thread drives a loop")
        try:
            with torch.inference_mode():
                return self._step()
        finally:
            self._step_lock.release()

    def run_until_idle(self) -> list[TokenEvent]:
        """Step until no sequence is left; every event, in order (for tests and batch jobs)."""
        events: list[TokenEvent] = []
        while self.has_work:
            events.extend(self.step())
        return events

    def _step(self) -> list[TokenEvent]:
        events = self._schedule()
        active = self._active
        if not active:
            return events
        n = len(active)
        full = self.block_size
        # Rows that prefill (new, or a full context to crop) still run in the batched pass with a
        # dummy token at position 0, which their prefill then overwrites: the batch stays a plain
        # slice of slots 0..n-1 instead of a gather.
        ids = [0 if s.ctx_len in (0, full) else s.tokens[-1] for s in active]
        pos = [0 if s.ctx_len in (0, full) else s.ctx_len for s in active]
        prefills = [i for i, s in enumerate(active) if s.ctx_len in (0, full)]
        # (n, V): ONE forward pass for all decoding sequences, skipped when every row comes from a prefill
        decoding = len(prefills) < n
        cache = self._cache
        if decoding:
            logits = cache.decode(ids, pos, fixed_shape=self.batch_invariant)
            self.forward_passes += 1
        else:
            logits = torch.empty(n, cache.vocab_size, device=cache.device)
        if prefills:
            windows = [active[i].tokens if active[i].ctx_len == 0 else active[i].tokens[-self.keep :] for i in prefills]
            if self.batch_invariant:  # one pass per window: its shapes are its own, not its neighbours'
                for i, w in zip(prefills, windows, strict=True):
                    logits[i] = cache.prefill([i], [w])[0, -1]
                self.forward_passes += len(prefills)
            else:  # new prompts and full contexts to crop, all in one more forward pass
                last = torch.tensor([len(w) - 1 for w in windows], device=cache.device)
                prefill_logits = cache.prefill(prefills, windows)  # (P, T, V)
                logits[prefills] = prefill_logits[torch.arange(len(prefills), device=cache.device), last]
                self.forward_passes += 1
            for i, w in zip(prefills, windows, strict=True):
                active[i].ctx_len = len(w)
        for i, seq in enumerate(active):
            if pos[i]:
                seq.ctx_len += 1

        if self._batch is None:
            self._batch = SamplingBatch.build([s.params for s in active], self._cache.vocab_size, self._cache.device)
        if self._batch.all_greedy:
            uniforms = torch.zeros(n)  # unused: greedy rows take the argmax
        else:
            uniforms = torch.tensor([s.uniforms.next() if s.uniforms is not None else 0.0 for s in active])
        new_ids: list[int] = sample(logits, self._batch, uniforms.to(self._cache.device)).tolist()
        self.tokens_sampled += n

        done: list[int] = []
        chars = self.vocab.chars
        for i, (seq, tok) in enumerate(zip(active, new_ids, strict=True)):
            seq.tokens.append(tok)
            seq.generated += 1
            text, stopped = seq.stops.feed(chars[tok])
            reason: FinishReason | None = None
            if stopped:
                reason = "stop"
            elif seq.generated >= seq.params.max_new_tokens:
                reason = "length"
                text += seq.stops.flush()
            events.append(TokenEvent(seq.handle, text, tok, seq.generated, reason))
            if reason is not None:
                done.append(i)
        self._remove(done)
        return events

    def _schedule(self) -> list[TokenEvent]:
        """Cancellations first (their slots are reusable at once), then admissions in FIFO order."""
        events: list[TokenEvent] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled and self._pending:
                keep: deque[_Sequence] = deque()
                for seq in self._pending:
                    if seq.handle.id in cancelled:
                        events.append(self._cancel_event(seq))
                        del self._live[seq.handle.id]
                    else:
                        keep.append(seq)
                self._pending = keep
        gone = [i for i, s in enumerate(self._active) if s.handle.id in cancelled]
        events.extend(self._cancel_event(self._active[i]) for i in gone)
        self._remove(gone)
        with self._lock:
            while self._pending and len(self._active) < self.capacity:
                self._active.append(self._pending.popleft())  # slot = its index; prefilled by this step
                self._batch = None
        return events

    def _cancel_event(self, seq: _Sequence) -> TokenEvent:
        return TokenEvent(seq.handle, seq.stops.flush(), None, seq.generated, "cancelled")

    def _remove(self, slots: list[int]) -> None:
        """Free ``slots`` (ascending), keeping the active slots dense by moving the last one down."""
        if not slots:
            return
        active = self._active
        leaving = [active[i].handle.id for i in slots]
        for i in reversed(slots):  # descending: the last slot is never one still to be removed
            last = active.pop()
            if i < len(active):
                if last.ctx_len:
                    self._cache.move(len(active), i, last.ctx_len)  # only the cells it uses
                active[i] = last
        self._batch = None
        with self._lock:
            for hid in leaving:
                del self._live[hid]
