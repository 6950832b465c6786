"""bench.text_load: the load generator's statistics on synthetic records, its schedule, and one tiny run against the echo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import text_load as tl
from bench.peers_report import TEXT_LOAD_BEGIN

pytestmark = pytest.mark.timeout(60)
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40


def rec(arrival: float, times: list[float], status: str = "ok", max_tokens: int | None = None) -> tl.Record:
    r = tl.Record(arrival, len(times) if max_tokens is None else max_tokens, sent=arrival, times=times, status=status)
    r.end = times[-1] if times else arrival
    return r


def test_the_schedule_repeats_with_its_seed_and_changes_with_it() -> None:
    a, b = tl.schedule(20.0, 30.0, TEXT, seed=7), tl.schedule(20.0, 30.0, TEXT, seed=7)
    assert a == b
    assert a != tl.schedule(20.0, 30.0, TEXT, seed=8)
    assert 450 < len(a) < 750  # about 600 Poisson arrivals
    assert all(0 < x.at < 30.0 for x in a) and [x.at for x in a] == sorted(x.at for x in a)
    assert all(16 <= len(x.prompt) <= 128 and x.prompt in TEXT for x in a)
    assert len({x.seed for x in a}) == len(a)  # a seed per request
    gaps = np.diff([0.0] + [x.at for x in a])
    assert np.mean(gaps) == pytest.approx(1 / 20.0, rel=0.15)  # exponential gaps of mean 1/rate
    tokens = [x.max_tokens for x in a]
    assert set(tokens) <= {32, 128, 512} and 0.6 < tokens.count(32) / len(a) < 0.8
    assert json.loads(tl.body(a[0])) == {
        "model": "transformer", "prompt": a[0].prompt, "max_tokens": a[0].max_tokens, "temperature": 0.8, "seed": a[0].seed, "stream": True,
    }  # fmt: skip


def test_prompts_come_from_the_validation_split_inside_the_vocabulary() -> None:
    vocab = tl.model_vocab(tl.ROOT / "models" / "transformer.safetensors")
    text = tl.validation_text(vocab)
    assert set(text) <= set(vocab) and len(text) > 100_000
    assert all(set(a.prompt) <= set(vocab) for a in tl.schedule(5.0, 10.0, text))


def test_goodput_keeps_only_requests_within_both_bounds() -> None:
    steady = [0.1 + 0.01 * i for i in range(32)]  # TTFT 100 ms, 10 ms gaps: good
    late = [0.3 + 0.01 * i for i in range(32)]  # TTFT 300 ms
    stall = [0.05 + 0.01 * i for i in range(31)] + [0.5]  # one gap of 190 ms: its p99 gap > 100 ms
    cut = [0.05, 0.06]  # unfinished at the cut
    records = [rec(0.0, steady), rec(0.0, late), rec(0.0, stall), rec(0.0, cut, "unfinished", 32), rec(0.0, [], "failed", 32)]
    records[-1].error = "HTTP 429"
    f = tl.point_figures(records, duration_s=10.0, cut_s=12.0)
    assert [tl.good(r) for r in records] == [True, False, False, False, False]
    assert f["good"] == 1 and f["goodput_tokens_s"] == pytest.approx(32 / 10.0)
    assert f["tokens_s"] == pytest.approx((32 * 3 + 2) / 10.0)
    assert (f["requests"], f["completed"], f["failed"], f["unfinished"], f["errors"]) == (5, 3, 1, 1, {"HTTP 429": 1})


def test_ttft_and_itl_percentiles() -> None:
    # 100 requests: TTFT i ms (i = 1..100), each with gaps of 1 ms but one request with a 500 ms gap
    records = [rec(0.0, [i / 1000, i / 1000 + 0.001, i / 1000 + 0.002]) for i in range(1, 101)]
    records[0].times[-1] = records[0].times[-2] + 0.5
    f = tl.point_figures(records, duration_s=10.0, cut_s=10.0)
    assert f["ttft_p50_ms"] == pytest.approx(50.0)
    assert f["ttft_p99_ms"] == pytest.approx(99.0)
    assert f["itl_p50_ms"] == pytest.approx(1.0)
    assert f["itl_p99_ms"] == pytest.approx(1.0)  # 1 gap in 200 is past the 99th percentile
    assert tl.good(records[1]) and not tl.good(records[0])


def test_unfinished_requests_are_counted_not_dropped() -> None:
    records = [rec(0.0, [0.01, 0.02]) for _ in range(98)] + [rec(0.0, [], "unfinished", 32), rec(0.0, [], "unfinished", 32)]
    f = tl.point_figures(records, duration_s=10.0, cut_s=20.0)
    assert f["ttft_p99_ms"] == math.inf  # 2% never got a token: the p99 is unbounded
    assert f["ttft_p50_ms"] == pytest.approx(10.0)
    assert not tl.keeps_up(f)
    tail = tl.point_figures([rec(0.0, [0.01, 0.02], "unfinished", 32)], duration_s=10.0, cut_s=20.0)
    assert tail["itl_p99_ms"] == pytest.approx(19_980.0)  # the gap from its last token to the cut
    # tokens delivered after the window count for neither rate
    assert tl.point_figures([rec(9.9, [9.95, 10.5])], duration_s=10.0, cut_s=11.0)["tokens_s"] == pytest.approx(0.1)


def test_chunked_sse_is_parsed_across_any_split() -> None:
    events = b'data: {"choices":[{"text":"ab"}]}\n\ndata: {"text":"c"}\n\ndata: [DONE]\n\n'
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (events[:10], events[10:37], events[37:])) + b"0\r\n\r\n"
    for step in (1, 3, 7, len(wire)):
        dechunk, sse = tl.Dechunk(), tl.Events()
        n = sum(sse.feed(dechunk.feed(wire[i : i + step])) for i in range(0, len(wire), step))
        assert (n, sse.done, dechunk.done, sse.error) == (3, True, True, "")
    bad = tl.Events()
    bad.feed(b'data: {"error":{"code":"503","message":"x"}}\n\n')
    assert bad.error == "error event: 503"


def test_a_tiny_run_against_the_echo(tmp_path: Path) -> None:
    paths = [tmp_path / "run.json", tmp_path / "plot.png", tmp_path / "REPORT.md"]
    (tmp_path / "REPORT.md").write_text("# report\n\nbefore\n")
    argv = ["--quick", "--only", "echo", "--rates", "5", "--duration", "1", "--drain", "2"]
    assert tl.main([*argv, "--json", str(paths[0]), "--plot", str(paths[1]), "--report", str(paths[2])]) == 0
    out = json.loads(paths[0].read_text())
    [point] = out["points"]
    assert point["side"] == "echo" and point["failed"] == 0 and point["unfinished"] == 0
    text = tl.validation_text(tl.model_vocab(tl.ROOT / "models" / "transformer.safetensors"))
    assert point["completed"] == point["requests"] == len(tl.schedule(5.0, 1.0, text, 0))
    assert point["short"] == 0 and point["tokens_s"] > 0
    report = paths[2].read_text()
    assert report.startswith("# report\n\nbefore\n") and report.count(TEXT_LOAD_BEGIN) == 1 and "| echo | 5 |" in report
    tl.write(out, None, None, paths[2])  # written again: the section is replaced, not repeated
    assert paths[2].read_text().count(TEXT_LOAD_BEGIN) == 1 and paths[1].stat().st_size > 0
