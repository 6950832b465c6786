"""KV-cache decoding and continuous batching: logits against full forwards, batch independence, stops, cancellation, validation."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from engine.decode import DecodeBatch, SequenceHandle, SequenceRequest, SlotCache, StopMatcher, TokenEvent
from engine.errors import InvalidPromptError, InvalidSamplingError, QueueFullError
from engine.modelfile import load_model
from engine.models import transformer
from engine.models.transformer import CharTransformer, DecodePrecision, Int8Linears, ScriptedForward, TransformerConfig
from engine.sampling import SamplingParams
from tests.paths import ROOT

BUNDLED = ROOT / "models" / "transformer.safetensors"
VOCAB = "\n abcdefghij"


def tiny_model(block: Literal["gpt2", "original"] = "gpt2", block_size: int = 16, seed: int = 0) -> CharTransformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=len(VOCAB), block_size=block_size, n_layer=2, n_head=2, d_model=16, d_ff=32, dropout=0.0, block=block
    )
    model = CharTransformer(cfg).eval()
    with torch.no_grad():  # wider than the training init: peaked logits, so no near-ties between tokens
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def bundled() -> DecodeBatch:
    return DecodeBatch.from_loaded(load_model(BUNDLED), max_batch=8)


def texts(events: list[TokenEvent]) -> dict[SequenceHandle, tuple[str, str | None]]:
    """Each sequence's emitted text and finish reason."""
    out: dict[SequenceHandle, tuple[str, str | None]] = {}
    for e in events:
        text, _ = out.get(e.handle, ("", None))
        out[e.handle] = (text + e.text, e.finish_reason)
    return out


def run_alone(model: CharTransformer, request: SequenceRequest, max_batch: int = 1, invariant: bool = False) -> tuple[str, str | None]:
    loop = DecodeBatch(model, VOCAB, max_batch=max_batch, batch_invariant=invariant)
    handle = loop.add(request)
    return texts(loop.run_until_idle())[handle]


# -- KV cache against full forward passes ------------------------------------------------------


@pytest.mark.parametrize("block", ["gpt2", "original"])
def test_kv_cache_logits_match_full_forward(block: Literal["gpt2", "original"]) -> None:
    model = tiny_model(block, block_size=12)
    cache = SlotCache(model, max_batch=3)
    cache.kv.normal_()  # stale garbage in every cell: the masks must hide whatever is past a sequence's length
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, len(VOCAB), (n,), generator=g).tolist() for n in (3, 9, 3)]
    starts = [0, 0, 0]  # where each sequence's window (what its cache holds) begins
    keep = 12 // 2
    refills: list[list[int]] = []
    with torch.inference_mode():
        for slots in ([1, 2], [0]):  # one batched prefill right-padded (9 and 3 tokens), one alone
            logits = cache.prefill(slots, [seqs[b] for b in slots])
            for k, b in enumerate(slots):
                torch.testing.assert_close(logits[k, : len(seqs[b])], model(torch.tensor([seqs[b]]))[0])
        for _ in range(12):  # crosses the 12-token window: slot 1 alone, then slots 0 and 2 together
            for s in seqs:
                s.append(int(torch.randint(0, len(VOCAB), (1,), generator=g)))
            rows = [b for b, s in enumerate(seqs) if len(s) - starts[b] <= 12]
            refill = [b for b in range(3) if b not in rows]
            logits = cache.decode(
                [seqs[b][-1] if b in rows else 0 for b in range(3)], [len(seqs[b]) - 1 - starts[b] if b in rows else 0 for b in range(3)]
            )
            if refill:  # the context policy: re-prefill the last block_size // 2 tokens at positions 0..
                for b in refill:
                    starts[b] = len(seqs[b]) - keep
                logits[refill] = cache.prefill(refill, [seqs[b][starts[b] :] for b in refill])[:, -1]
                refills.append(refill)
            for b in range(3):
                window = torch.tensor([seqs[b][starts[b] :]])
                torch.testing.assert_close(logits[b], model(window)[0, -1], rtol=1e-5, atol=1e-5)
    assert [0, 2] in refills and [1] in refills  # the re-prefill paths (adjacent and scattered slots) really ran


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("block", ["gpt2", "original"])
def test_the_scripted_forward_is_the_eager_forward_bit_for_bit(block: Literal["gpt2", "original"], precision: DecodePrecision) -> None:
    """SlotCache runs ScriptedForward (one TorchScript graph, the GIL released once per forward): its
    logits and the cache cells it writes equal the eager forward_cached's exactly, for a prefill and
    for decode steps at growing contexts over ragged positions, in float32 and with int8 linears."""
    model = tiny_model(block, block_size=32)
    scripted = ScriptedForward(model, precision)
    linear = Int8Linears(model) if precision == "int8" else model.inference_linears()
    cfg = model.config
    eager_kv, script_kv = (torch.zeros(cfg.n_layer, 2, 3, cfg.n_head, 32, cfg.d_model // cfg.n_head) for _ in range(2))
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        idx = torch.randint(0, len(VOCAB), (3, 9), generator=gen)
        pos = torch.arange(9).expand(3, 9)
        assert torch.equal(scripted(idx, pos, script_kv[:, :, :, :, :9]), model.forward_cached(idx, pos, eager_kv[:, :, :, :, :9], linear))
        for step in range(9, 20):
            idx = torch.randint(0, len(VOCAB), (3, 1), generator=gen)
            pos = torch.tensor([[step], [step - 2], [step - 5]])  # sequences of different lengths
            want = model.forward_cached(idx, pos, eager_kv[:, :, :, :, : step + 1], linear)
            assert torch.equal(scripted(idx, pos, script_kv[:, :, :, :, : step + 1]), want)
    assert torch.equal(script_kv, eager_kv)
    assert isinstance(DecodeBatch(model, VOCAB, max_batch=2)._cache.forward, ScriptedForward)


def test_int8_linears_cost_the_bundled_model_little_validation_loss() -> None:
    """--decode-precision int8 (int8 linears, a float16 cache): next-character log-likelihood over validation
    text, through prefill and decode steps, stays within 0.01 nats/char of float32's, and the probabilities
    within 0.005 on average (measured: +0.002, 0.0005)."""
    from training.data import load_shakespeare

    val = load_shakespeare().val[: 16 * 128].view(16, 128)
    model = load_model(BUNDLED).module
    assert isinstance(model, CharTransformer)
    logp = {}
    for precision in ("float32", "int8"):
        cache = SlotCache(model, 16, precision)
        with torch.inference_mode():  # a prefill of 64 characters, then 63 decode steps (teacher-forced)
            logits = [cache.prefill(list(range(16)), val[:, :64].tolist())]
            logits += [cache.decode(val[:, t].tolist(), [t] * 16).unsqueeze(1) for t in range(64, 127)]
        logp[precision] = torch.log_softmax(torch.cat(logits, dim=1), dim=-1)  # predicting characters 1..127
    nats = {p: -lp.gather(-1, val[:, 1:].unsqueeze(-1)).mean().item() for p, lp in logp.items()}
    assert abs(nats["int8"] - nats["float32"]) < 0.01
    assert (logp["int8"].exp() - logp["float32"].exp()).abs().mean().item() < 0.005
    assert not torch.equal(logp["int8"], logp["float32"])  # int8 really ran


def test_an_unknown_decode_precision_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="decode precision must be one of float32, int8, got 'int4'"):
        DecodeBatch(tiny_model(), VOCAB, precision="int4")  # type: ignore[arg-type]


def test_without_torchscript_the_decode_loop_runs_the_eager_forward_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_script() -> None:
        raise RuntimeError("TorchScript is not available")

    monkeypatch.setattr(transformer, "_scripted_graph", no_script)
    model = tiny_model()
    with pytest.warns(UserWarning, match=r"decoding eagerly: TorchScript could not compile the cached forward \(RuntimeError: TorchScript"):
        loop = DecodeBatch(model, VOCAB, max_batch=2)
    assert not isinstance(loop._cache.forward, ScriptedForward)
    request = SequenceRequest("abc", SamplingParams(temperature=0, max_new_tokens=8))
    loop.add(request)
    eager = texts(loop.run_until_idle())
    monkeypatch.undo()
    scripted = DecodeBatch(model, VOCAB, max_batch=2)
    scripted.add(request)
    assert list(eager.values()) == list(texts(scripted.run_until_idle()).values())  # the same text either way


def test_greedy_bundled_model_matches_naive_forward_loop(bundled: DecodeBatch) -> None:
    model = bundled._cache.model
    prompt = "ROMEO:\nWhat light through yonder window breaks?\n"
    ids = bundled.vocab.encode(prompt)
    with torch.inference_mode():
        for _ in range(40):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = bundled.vocab.decode(ids[len(prompt) :])
    handle = bundled.add(SequenceRequest(prompt, SamplingParams(temperature=0, max_new_tokens=40)))
    assert texts(bundled.run_until_idle())[handle] == (expected, "length")


def test_context_window_policy_matches_cropped_full_forward() -> None:
    """Greedy decoding past the window equals full forwards over the documented crop (last block_size // 2 tokens)."""
    model = tiny_model(block_size=8)
    prompt = "abcdefghij a"  # 12 characters: the first 4 are dropped
    ids = [VOCAB.index(c) for c in prompt][-8:]
    start = 0
    with torch.inference_mode():
        for _ in range(30):
            if len(ids) - start > 8:
                start = len(ids) - 4
            ids.append(int(model(torch.tensor([ids[start:]]))[0, -1].argmax()))
    loop = DecodeBatch(model, VOCAB, max_batch=2)
    handle = loop.add(SequenceRequest(prompt, SamplingParams(temperature=0, max_new_tokens=30)))
    assert handle.truncated_chars == 4 and handle.prompt_tokens == 8
    assert texts(loop.run_until_idle())[handle] == ("".join(VOCAB[i] for i in ids[8:]), "length")


# -- continuous batching -----------------------------------------------------------------------

REQUESTS = [
    SequenceRequest("a", SamplingParams(temperature=1.0, seed=1, max_new_tokens=40)),
    SequenceRequest("hi bad\n", SamplingParams(temperature=0.7, top_k=4, seed=2, max_new_tokens=25)),
    SequenceRequest("jig", SamplingParams(temperature=0, max_new_tokens=33)),
    SequenceRequest("cab bag", SamplingParams(temperature=1.3, top_p=0.8, seed=3, max_new_tokens=7)),
    SequenceRequest("\n", SamplingParams(temperature=0.9, top_k=6, top_p=0.9, seed=4, max_new_tokens=45, stop=("ee", "j\n"))),
    SequenceRequest("abcdefghij abcdefghij", SamplingParams(temperature=1.0, seed=5, max_new_tokens=3)),
]


def test_batched_decode_equals_one_at_a_time() -> None:
    """Exact text, so in the batch-invariant mode (by default, equal only up to float rounding: see engine.decode)."""
    model = tiny_model(block_size=16)
    alone = [run_alone(model, r, max_batch=3, invariant=True) for r in REQUESTS]
    loop = DecodeBatch(model, VOCAB, max_batch=3, max_pending=8, batch_invariant=True)
    events: list[TokenEvent] = []
    handles = [loop.add(REQUESTS[0]), loop.add(REQUESTS[1])]
    for _ in range(5):
        events += loop.step()
    handles += [loop.add(r) for r in REQUESTS[2:5]]  # joins mid-flight; two of them wait for a slot
    for _ in range(3):
        events += loop.step()
    assert loop.active_count == 3 and loop.pending_count > 0
    handles.append(loop.add(REQUESTS[5]))
    events += loop.run_until_idle()
    got = texts(events)
    assert [got[h] for h in handles] == alone
    assert len({len(t) for t, _ in alone}) > 3  # they really left at different steps
    assert loop.active_count == 0 and loop.capacity - loop.active_count == 3


@pytest.fixture(scope="module")
def bundled_invariant() -> DecodeBatch:
    return DecodeBatch.from_loaded(load_model(BUNDLED), max_batch=8, batch_invariant=True)


def test_same_request_alone_and_in_mixed_batch(bundled_invariant: DecodeBatch) -> None:
    bundled = bundled_invariant
    request = SequenceRequest("KING:\n", SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=7, max_new_tokens=60))
    h = bundled.add(request)
    alone = texts(bundled.run_until_idle())[h]
    others = [
        SequenceRequest("First Citizen:\nWe are", SamplingParams(temperature=1.2, seed=s, max_new_tokens=20 + 7 * s)) for s in range(4)
    ] + [SequenceRequest("a", SamplingParams(temperature=0, max_new_tokens=80))]
    for r in others[:3]:
        bundled.add(r)
    events = bundled.step() + bundled.step()
    h2 = bundled.add(request)  # joins a batch already decoding
    for r in others[3:]:
        bundled.add(r)
    events += bundled.run_until_idle()
    assert texts(events)[h2] == alone
    assert alone[1] == "length" and len(alone[0]) == 60


def test_one_forward_pass_per_step_for_all_active_sequences() -> None:
    model = tiny_model()
    loop = DecodeBatch(model, VOCAB, max_batch=4)
    for r in REQUESTS[:4]:
        loop.add(r)
    loop.step()  # admission: four prefills
    calls: list[int] = []
    original = loop._cache.forward

    def counting(idx: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        calls.append(idx.shape[0])
        return original(idx, pos, cache)

    loop._cache.forward = counting
    events = loop.step()
    assert calls == [4] and len(events) == 4 and all(e.token_id is not None for e in events)


# -- cancellation, capacity, stops, length ------------------------------------------------------


def test_cancel_frees_the_slot_for_a_new_sequence() -> None:
    loop = DecodeBatch(tiny_model(), VOCAB, max_batch=1, max_pending=0)
    a = loop.add(SequenceRequest("abc", SamplingParams(temperature=0, max_new_tokens=100)))
    with pytest.raises(QueueFullError, match="decode loop is full: 1 sequences decoding and 0 waiting"):
        loop.add(SequenceRequest("b"))
    first = loop.step()
    assert [e.handle for e in first] == [a] and loop.active_count == loop.capacity
    assert loop.cancel(a)
    events = loop.step()
    assert [(e.handle, e.finish_reason, e.token_id) for e in events] == [(a, "cancelled", None)]
    assert loop.capacity - loop.active_count == 1 and not loop.has_work and not loop.cancel(a)
    b = loop.add(SequenceRequest("b", SamplingParams(temperature=0, max_new_tokens=2)))
    assert texts(loop.run_until_idle())[b][1] == "length"


def test_cancel_a_waiting_sequence() -> None:
    loop = DecodeBatch(tiny_model(), VOCAB, max_batch=1, max_pending=1)
    a = loop.add(SequenceRequest("a", SamplingParams(temperature=0, max_new_tokens=3)))
    b = loop.add(SequenceRequest("b", SamplingParams(temperature=0, max_new_tokens=3)))
    assert loop.pending_count == 2  # admission happens at the next step
    assert [e.handle for e in loop.step()] == [a]
    assert loop.pending_count == 1 and loop.cancel(b)
    events = loop.step()
    assert {(e.handle, e.finish_reason) for e in events} == {(a, None), (b, "cancelled")}
    assert loop.pending_count == 0
    assert [e.handle for e in loop.run_until_idle()] == [a]


def test_max_new_tokens_ends_with_length() -> None:
    loop = DecodeBatch(tiny_model(), VOCAB, max_batch=2)
    h = loop.add(SequenceRequest("abc", SamplingParams(temperature=1.0, seed=0, max_new_tokens=5)))
    events = loop.run_until_idle()
    assert [e.n_generated for e in events] == [1, 2, 3, 4, 5]
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
    assert len(texts(events)[h][0]) == 5


def test_stop_string_spanning_tokens_ends_with_stop_and_is_not_emitted(bundled: DecodeBatch) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=60)
    h = bundled.add(SequenceRequest("ROMEO:\n", params))
    full, _ = texts(bundled.run_until_idle())[h]
    stop = full[22:26]  # four characters = four tokens
    assert stop.strip() and full.find(stop) > 3
    h = bundled.add(SequenceRequest("ROMEO:\n", SamplingParams(temperature=0, max_new_tokens=60, stop=("zzz", stop))))
    events = bundled.run_until_idle()
    assert texts(events)[h] == (full[: full.find(stop)], "stop")
    assert len(events) == full.find(stop) + len(stop)  # it stopped on the token that completed the stop string


def test_stop_matcher_holds_back_possible_starts() -> None:
    m = StopMatcher(["bcd", "xy"])
    assert [m.feed(c) for c in "abcx"] == [("a", False), ("", False), ("", False), ("bc", False)]
    assert m.held == "x"
    assert m.feed("bcdz") == ("xbcdz"[: "xbcdz".find("bcd")], True)
    m = StopMatcher(["ab"])
    assert m.feed("a") == ("", False) and m.flush() == "a"


def test_held_back_text_is_flushed_at_length() -> None:
    model = tiny_model()
    plain = run_alone(model, SequenceRequest("a", SamplingParams(temperature=0, max_new_tokens=6)))[0]
    never = plain[-1] + "\t"  # starts like the last character, can never complete (tab is not in the vocab)
    assert run_alone(model, SequenceRequest("a", SamplingParams(temperature=0, max_new_tokens=6, stop=(never,)))) == (plain, "length")


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "error", "message"),
    [
        ("abc", InvalidPromptError, "prompt character 'z' at position 3 is not in the model's vocabulary"),
        ("", InvalidPromptError, 'prompt is empty: the model needs at least one character to condition on (send "\\n" to start afresh)'),
    ],
)
def test_bad_prompts_raise_precise_errors(prompt: str, error: type[Exception], message: str) -> None:
    loop = DecodeBatch(tiny_model(), VOCAB, max_batch=1)
    with pytest.raises(error) as info:
        loop.add(SequenceRequest(prompt + ("z!" if prompt else "")))
    assert str(info.value) == message
    assert not loop.has_work


def test_loop_cap_on_max_new_tokens() -> None:
    loop = DecodeBatch(tiny_model(), VOCAB, max_batch=1, max_new_tokens_cap=100)
    with pytest.raises(InvalidSamplingError, match=r"^max_new_tokens must be an integer between 1 and 100, got 101$"):
        loop.add(SequenceRequest("a", SamplingParams(max_new_tokens=101)))


def test_seed_is_reported_and_reproduces() -> None:
    model = tiny_model()
    loop = DecodeBatch(model, VOCAB, max_batch=2)
    h = loop.add(SequenceRequest("ab", SamplingParams(temperature=1.0, max_new_tokens=20)))
    first = texts(loop.run_until_idle())[h]
    assert run_alone(model, SequenceRequest("ab", SamplingParams(temperature=1.0, seed=h.seed, max_new_tokens=20))) == first
    other = run_alone(model, SequenceRequest("ab", SamplingParams(temperature=1.0, seed=h.seed + 1, max_new_tokens=20)))
    assert other != first  # the seed really steers the draw
