"""The HTTP edge with the official ``openai`` package, as its users call it: models, completions,
streams, chat, images (pixels equal to the gRPC SDK's), and errors as the package's own classes."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from PIL import Image

from clients import Client
from server.runtime.front import free_port
from tests.serving import ServerThread

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServerThread, openai.OpenAI]]:
    port = free_port()
    with ServerThread(http_port=port) as thread:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        yield thread, api


def test_the_models_are_listed_with_what_they_accept(served: tuple[ServerThread, openai.OpenAI]) -> None:
    _, api = served
    models = {m.id: m for m in api.models.list()}
    assert {"vae", "gan", "transformer"} <= set(models)
    assert models["gan"].model_extra is not None and models["gan"].model_extra["accepts"]["images"]["size"] == "28x28"


def test_a_completion_is_the_text_the_grpc_sdk_gets(served: tuple[ServerThread, openai.OpenAI]) -> None:
    thread, api = served
    completion = api.completions.create(model="transformer", prompt="ROMEO:", max_tokens=40, seed=3, temperature=0.8)
    with Client(thread.address, timeout=60) as client:
        expected = "".join(client.stream_text("transformer", "ROMEO:", max_new_tokens=40, seed=3, temperature=0.8))
    assert completion.choices[0].text == expected and completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 40


def test_a_streamed_completion_comes_in_pieces_that_make_the_same_text(served: tuple[ServerThread, openai.OpenAI]) -> None:
    _, api = served
    whole = api.completions.create(model="transformer", prompt="ROMEO:", max_tokens=30, seed=5).choices[0].text
    chunks = list(api.completions.create(model="transformer", prompt="ROMEO:", max_tokens=30, seed=5, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_streamed_chat_answers_as_the_next_speaker(served: tuple[ServerThread, openai.OpenAI]) -> None:
    _, api = served
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "name": "ROMEO", "content": "What light through yonder window breaks?"}]
    stream = api.chat.completions.create(model="transformer", messages=messages, max_tokens=60, seed=1, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and "\n\n" not in text  # one turn: the reply stops where the speaker's turn ends
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_images_are_the_pixels_the_grpc_sdk_gets(served: tuple[ServerThread, openai.OpenAI]) -> None:
    thread, api = served
    result = api.images.generate(prompt="digits", model="gan", n=8, response_format="b64_json", extra_body={"seed": 7, "labels": "0-3"})
    assert result.data is not None
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json or "")))) for d in result.data])
    with Client(thread.address, timeout=60) as client:
        expected = client.generate_images("gan", 8, seed=7, labels=range(4))
    assert pixels.shape == (8, 28, 28) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, expected)


def test_errors_are_the_packages_own_classes_naming_the_field(served: tuple[ServerThread, openai.OpenAI]) -> None:
    _, api = served
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served; available: flow, gan, transformer, vae"):
        api.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match=r"temperature must be a number in \[0, 2\], got 5") as bad:
        api.completions.create(model="transformer", prompt="x", temperature=5)
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer between 1 and 1024, got 5000") as big:
        api.completions.create(model="transformer", prompt="x", max_tokens=5000)
    assert isinstance(big.value.body, dict) and big.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="response_format must be b64_json"):
        api.images.generate(prompt="digits", model="gan", n=1, response_format="url")
    with pytest.raises(openai.BadRequestError, match="is a char-transformer model: send text params"):
        api.images.generate(prompt="digits", model="transformer", n=1)
