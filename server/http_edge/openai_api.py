"""OpenAI-shaped bodies in and out: JSON requests checked field by field into ``GenerateRequest``s,
results into OpenAI's response and chunk shapes, failures into its error shape.

Every check names the field as the client spelled it (``max_tokens``, not our ``max_new_tokens``);
the model's own rules (ranges, vocabulary, labels) stay the core's (server/pipeline/requests.py),
whose messages are renamed here the same way.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from genserve.v1 import generator_pb2 as pb
from server.pipeline.statuses import Code

MAX_STOPS = 4  # OpenAI's limit on stop sequences
CHAT_TURN = "{name}:\n{content}\n\n"  # the bundled plays' turns: a speaker's name, a colon, the lines, a blank line
CHAT_STOP = "\n\n"  # a reply ends with its speaker's turn
ASSISTANT = "ASSISTANT"  # the reply's speaker when the request names none
OUR_NAMES = {"max_new_tokens": "max_tokens", "label": "labels"}  # the core's field names, as OpenAI's clients spell them

# Code -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[Code, tuple[int, str]] = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.OUT_OF_RANGE: (400, "invalid_request_error"),
    Code.ALREADY_EXISTS: (400, "invalid_request_error"),
    Code.UNAUTHENTICATED: (401, "authentication_error"),
    Code.PERMISSION_DENIED: (403, "permission_error"),
    Code.NOT_FOUND: (404, "not_found_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.CANCELLED: (499, "cancelled"),
    Code.UNAVAILABLE: (503, "service_unavailable"),
    Code.DEADLINE_EXCEEDED: (504, "timeout"),
}


class BadRequest(Exception):
    """Raised when a body cannot become a request: the message names ``param``; ``status`` is HTTP's."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def param_of(message: str) -> str | None:
    """The field a core message starts with ("seed must be ..."), as OpenAI's clients name it."""
    first = message.split(" ", 1)[0]
    if first.isidentifier() and first.islower():
        return OUR_NAMES.get(first, first)
    return None


def renamed(message: str) -> str:
    return message.replace("max_new_tokens", "max_tokens")


# -- fields -----------------------------------------------------------------------------------


def _string(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required", name)
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got {type(value).__name__}", name)
    return value


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}, got {_brief(value)}", name)
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float, *, open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise BadRequest(f"{name} must be a number in {bounds}, got {_brief(value)}", name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {_brief(value)}", name)
    return value


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _stops(body: Mapping[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return list(stops)


def _only_one(body: Mapping[str, Any]) -> None:
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise BadRequest(f"n must be 1 for text (one completion a request), got {_brief(n)}", "n")


# -- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextCall:
    request: pb.GenerateRequest
    stream: bool
    chat: bool


def _text_params(body: Mapping[str, Any], prompt: str, extra_stops: Sequence[str] = ()) -> pb.TextParams:
    _only_one(body)
    params = pb.TextParams(prompt=prompt, stop=[*_stops(body), *extra_stops][: MAX_STOPS + len(extra_stops)])
    max_tokens = _integer(body, "max_tokens", 1, 2**32 - 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", 1, 2**32 - 1)  # the chat API's newer name
    if max_tokens is not None:
        params.max_new_tokens = max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        params.temperature = temperature
    top_p = _number(body, "top_p", 0.0, 1.0, open_low=True)
    if top_p is not None:
        params.top_p = top_p
    seed = _integer(body, "seed", 0, 2**64 - 1)
    if seed is not None:
        params.seed = seed
    return params


def completion_request(body: Mapping[str, Any]) -> TextCall:
    model = _string(body, "model", required=True)
    prompt: Any = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (or a list of one string)", "prompt")
    request = pb.GenerateRequest(model=model, text=_text_params(body, prompt))
    return TextCall(request, _bool(body, "stream"), chat=False)


def chat_prompt(messages: object) -> str:
    """The messages as the plays' turns (``NAME:\\n<lines>\\n\\n``, NAME the message's ``name`` or its
    role in capitals), then the reply's speaker: the last assistant message's name (an empty last
    assistant message only names it), else ASSISTANT."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    turns, reply_as = [], ASSISTANT
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role and content", f"messages[{i}]")
        content, name = message.get("content"), message.get("name")
        if isinstance(content, list):  # content parts: the text ones, in order
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        if name is not None and not isinstance(name, str):
            raise BadRequest(f"messages[{i}].name must be a string", f"messages[{i}].name")
        speaker = name or message["role"].upper()
        if message["role"] == "assistant":
            reply_as = speaker
            if i == len(messages) - 1 and not content:  # an empty last assistant turn only names the reply's speaker
                break
        turns.append(CHAT_TURN.format(name=speaker, content=content.strip("\n")))
    return "".join(turns) + f"{reply_as}:\n"


def chat_request(body: Mapping[str, Any]) -> TextCall:
    model = _string(body, "model", required=True)
    prompt = chat_prompt(body.get("messages"))
    request = pb.GenerateRequest(model=model, text=_text_params(body, prompt, extra_stops=[CHAT_STOP]))
    return TextCall(request, _bool(body, "stream"), chat=True)


def image_request(body: Mapping[str, Any], image_size: int | None) -> pb.GenerateRequest:
    model = _string(body, "model", required=True)
    n = _integer(body, "n", 1, 2**32 - 1)
    response_format = _string(body, "response_format") or "b64_json"
    if response_format != "b64_json":
        raise BadRequest(
            f"response_format must be b64_json (PNG images in the response; no URLs are kept), got {response_format!r}", "response_format"
        )
    size = _string(body, "size")
    if size is not None and image_size is not None and size != f"{image_size}x{image_size}":
        raise BadRequest(f"size must be {image_size}x{image_size} (the model's own), got {size!r}", "size")
    params = pb.ImageParams(n=1 if n is None else n)
    steps = _integer(body, "steps", 0, 2**32 - 1)  # iterative models (flow); the model's range is the core's to check
    if steps is not None:
        params.steps = steps
    guidance = _number(body, "guidance", 0.0, 20.0)
    if guidance is not None:
        params.guidance = guidance
    seed = _integer(body, "seed", 0, 2**63 - 1)
    if seed is not None:
        params.seed = seed
    labels = body.get("labels")
    if labels is not None:
        params.labels.extend(_labels(labels, params.n))
    return pb.GenerateRequest(model=model, image=params)


def _labels(value: object, n: int) -> list[int]:
    """The SDK's rules: one label, a list (cycled when shorter than n), or a spec such as "0-9"."""
    if isinstance(value, str):
        labels: list[int] = []
        for part in value.replace(" ", "").split(","):
            low, dash, high = part.partition("-")
            try:
                first, last = int(low), int(high if dash else low)
            except ValueError:
                raise BadRequest(f"labels {value!r}: {part!r} is not a label or a range like 0-9", "labels") from None
            labels.extend(range(first, last + 1))
    elif isinstance(value, int) and not isinstance(value, bool):
        labels = [value]
    elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        labels = list(value)
    else:
        raise BadRequest("labels must be an integer, a list of integers or a spec such as 0-9", "labels")
    if any(not -(2**31) <= v < 2**31 for v in labels):
        raise BadRequest("labels must be integers in the model's range", "labels")
    if len(labels) > n:
        raise BadRequest(f"labels has {len(labels)} entries, more than the {n} samples; give at most {n} (fewer are cycled)", "labels")
    if 1 < len(labels) < n:
        labels = [labels[i % len(labels)] for i in range(n)]
    return labels


# -- responses --------------------------------------------------------------------------------


def completion_chunk(call_id: str, model: str, text: str, finish: str | None, *, chat: bool, first: bool = False) -> dict[str, Any]:
    created = int(time.time())
    if chat:
        delta: dict[str, Any] = {"content": text} if text else {}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"id": call_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": call_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def completion_body(call_id: str, model: str, text: str, finish: str, prompt_chars: int, tokens: int, *, chat: bool) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_chars, "completion_tokens": tokens, "total_tokens": prompt_chars + tokens}
    created = int(time.time())
    if chat:
        message = {"role": "assistant", "content": text}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {"id": call_id, "object": "chat.completion", "created": created, "model": model, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": call_id, "object": "text_completion", "created": created, "model": model, "choices": [choice], "usage": usage}


def png_b64(pixels: np.ndarray) -> str:
    """One (h, w) uint8 sample as a base64 PNG."""
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()
