"""A Generate call's queue: the tokens that are ready together go out as one message, the first at once,
the rest grouped by the stream interval."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import numpy as np
import pytest

from engine.decode import SequenceHandle, TokenEvent
from engine.images import ImageRequest, ImageResult
from genserve.v1 import generator_pb2 as pb
from server.grpc_edge.outbox import CallQueue
from server.pipeline.jobs import COMPLETE, Job, Outcome
from server.pipeline.statuses import Code

pytestmark = pytest.mark.asyncio

HANDLE = SequenceHandle(id=1, request_id="t", seed=0, prompt_tokens=3, truncated_chars=0)
JOB = cast(Job, type("FakeJob", (), {"id": "t"})())  # CallQueue reads only the job's id


def token(char: str, n: int) -> TokenEvent:
    return TokenEvent(HANDLE, char, ord(char), n)


async def test_tokens_ready_together_go_out_as_one_message() -> None:
    queue = CallQueue()
    for n, char in enumerate("abc", start=1):
        queue.emit(JOB, token(char, n))
    message = cast(pb.GenerateResponse, await queue.get())
    assert message.id == "t" and message.text.text == "abc"
    assert list(message.text.token_ids) == [ord("a"), ord("b"), ord("c")] and message.text.n_generated == 3
    queue.emit(JOB, token("d", 4))  # the handler has the first message: the next token starts another
    assert message.text.text == "abc"
    later = cast(pb.GenerateResponse, await queue.get())
    assert later.text.text == "d" and list(later.text.token_ids) == [ord("d")] and later.text.n_generated == 4


async def test_a_waiting_handler_gets_the_first_token_at_once() -> None:
    queue = CallQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.emit(JOB, token("a", 1))
    first = cast(pb.GenerateResponse, await asyncio.wait_for(getter, 1.0))
    assert first.text.text == "a" and first.text.n_generated == 1


async def test_the_outcome_and_image_chunks_are_never_merged() -> None:
    queue = CallQueue()
    queue.emit(JOB, token("a", 1))
    queue.finish(JOB, Outcome(reason="length"))
    queue.emit(JOB, token("b", 2))  # after the outcome (a late event): not folded into anything before it
    items: list[Any] = [await queue.get() for _ in range(3)]
    assert items[0].text.text == "a" and items[1] == Outcome(reason="length") and items[2].text.text == "b"

    images = CallQueue()
    result = ImageResult(ImageRequest(n=2), 0, 0, 2, np.zeros((1, 2, 2), np.uint8), None)
    images.emit(JOB, result)
    images.emit(JOB, ImageResult(ImageRequest(n=2), 0, 1, 2, np.ones((1, 2, 2), np.uint8), None))
    images.finish(JOB, COMPLETE)
    chunks: list[Any] = [await images.get() for _ in range(3)]
    assert [c.images.offset for c in chunks[:2]] == [0, 1] and chunks[2] == COMPLETE


async def test_an_error_after_tokens_still_ends_the_call() -> None:
    queue = CallQueue()
    queue.emit(JOB, token("a", 1))
    queue.finish(JOB, Outcome.error(Code.DEADLINE_EXCEEDED, "late"))
    assert cast(pb.GenerateResponse, await queue.get()).text.text == "a"
    assert cast(Outcome, await queue.get()).code == Code.DEADLINE_EXCEEDED


async def test_a_stream_interval_holds_tokens_back_until_it_is_reached() -> None:
    queue = CallQueue(stream_interval=4)
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.emit(JOB, token("a", 1))  # the first token: at once, whatever the interval
    assert cast(pb.GenerateResponse, await asyncio.wait_for(getter, 1.0)).text.text == "a"
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)  # the handler waits for its next message
    for n, char in enumerate("bcd", start=2):
        queue.emit(JOB, token(char, n))
        await asyncio.sleep(0)
        assert not getter.done()  # 3 of 4 tokens: the handler sleeps on
    queue.emit(JOB, token("e", 5))
    chunk = cast(pb.GenerateResponse, await asyncio.wait_for(getter, 1.0))
    assert chunk.text.text == "bcde" and chunk.text.n_generated == 5 and len(chunk.text.token_ids) == 4


async def test_the_outcome_sends_what_the_interval_held_back() -> None:
    queue = CallQueue(stream_interval=8)
    queue.emit(JOB, token("a", 1))
    assert cast(pb.GenerateResponse, await queue.get()).text.text == "a"
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.emit(JOB, token("b", 2))
    queue.emit(JOB, token("c", 3))
    await asyncio.sleep(0)
    assert not getter.done()
    queue.finish(JOB, Outcome(reason="length"))
    assert cast(pb.GenerateResponse, await asyncio.wait_for(getter, 1.0)).text.text == "bc"
    assert await queue.get() == Outcome(reason="length")


async def test_a_handler_that_comes_back_early_waits_for_the_interval_too() -> None:
    queue = CallQueue(stream_interval=3)
    queue.emit(JOB, token("a", 1))
    assert cast(pb.GenerateResponse, await queue.get()).text.text == "a"
    queue.emit(JOB, token("b", 2))  # the handler was busy sending "a"; it asks again with one token queued
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.emit(JOB, token("c", 3))
    queue.emit(JOB, token("d", 4))
    assert cast(pb.GenerateResponse, await asyncio.wait_for(getter, 1.0)).text.text == "bcd"
