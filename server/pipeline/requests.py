"""Requests -> checked jobs: every rule a request must meet is checked here, once, at admission,
with the engine's own rules (``Engine.check``, ``SamplingParams``, one ``max_new_tokens``
cap: the server's, which is also the engine's decode cap), so a job that enters the pipeline can be
served. A request that cannot is refused (``Refused``) with a reason that names what was wrong.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping

from engine import Engine, ImageRequest, ModelRegistry, SamplingParams, SequenceRequest, ServedModel, check_max_new_tokens
from engine.errors import InvalidRequestError, ModelNotFound
from genserve.v1 import generator_pb2 as pb
from server.config import ServerConfig
from server.pipeline.jobs import Job, Recipient, Rpc
from server.pipeline.statuses import Code, Refused, status_of

MAX_ID_LENGTH = 128  # characters of a client's request id
_ID_PREFIX = os.urandom(4).hex()  # ids of Generate calls that bring none: unique per process, cheap
_ids = itertools.count(1)


def _brief(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def call_id(request: pb.GenerateRequest) -> str:
    """A Generate call's job id: the client's (cut to MAX_ID_LENGTH), or a fresh one."""
    return request.id[:MAX_ID_LENGTH] or f"{_ID_PREFIX}-{next(_ids)}"


def check_stream_id(job_id: str, in_flight: Mapping[str, Job]) -> None:
    """A GenerateStream request's id: given, not too long, and not already in flight on the stream."""
    if not job_id:
        raise Refused(Code.INVALID_ARGUMENT, "id is empty: tag each request with an id unique among your in-flight ones")
    if len(job_id) > MAX_ID_LENGTH:
        raise Refused(Code.INVALID_ARGUMENT, f"id has {len(job_id)} characters; the limit is {MAX_ID_LENGTH}")
    if job_id in in_flight:
        raise Refused(Code.ALREADY_EXISTS, f"id {_brief(job_id)} is already in flight on this stream")


def timeout_of(timeout_ms: int, remaining: float | None) -> float | None:
    """The request's own timeout, capped by the call's deadline; None when neither is set."""
    own = timeout_ms / 1000 if timeout_ms else None
    if remaining is None:
        return own
    return remaining if own is None else min(own, remaining)


class JobBuilder:
    """Turns a ``GenerateRequest`` into a checked ``Job``, or raises Refused (INVALID_ARGUMENT, NOT_FOUND)."""

    def __init__(self, config: ServerConfig, registry: ModelRegistry, engine: Engine) -> None:
        self.registry = registry
        self.engine = engine
        self.max_new_tokens = config.max_new_tokens  # the one cap (the engine's decode batches are built with it too)
        self.default_new_tokens = min(config.default_new_tokens, config.max_new_tokens)

    def build(self, request: pb.GenerateRequest, rpc: Rpc, job_id: str, recipient: Recipient) -> Job:
        which = request.WhichOneof("params")
        if which is None:
            raise Refused(Code.INVALID_ARGUMENT, "request has no params: set image (for image models) or text (for text models)")
        served = self._served(request)
        if which == "image":
            return Job(job_id, rpc, served, recipient, 0.0, image=self._image(served, request.image, job_id))
        return Job(job_id, rpc, served, recipient, 0.0, text=self._text(served, request.text, job_id))

    def _served(self, request: pb.GenerateRequest) -> ServedModel:
        try:
            return self.registry.get(request.model, request.version or None)
        except ModelNotFound as e:
            raise Refused(*status_of(e)) from None

    def _image(self, served: ServedModel, p: pb.ImageParams, job_id: str) -> ImageRequest:
        if served.info.image is None:
            raise Refused(Code.INVALID_ARGUMENT, f"model {served.name!r} is a {served.kind} model: send text params, not image")
        labels = p.labels
        image = ImageRequest(
            p.n,
            p.seed if p.HasField("seed") else None,
            list(labels) if labels else None,
            p.want_float,
            job_id,
            steps=p.steps if p.HasField("steps") else None,
            guidance=p.guidance if p.HasField("guidance") else None,
            preview_every=p.preview_every,
        )
        try:
            self.engine.check(served, image)  # the engine's rules: n, seed, labels (count, range, conditional model)
        except InvalidRequestError as e:
            raise Refused(*status_of(e)) from None
        return image

    def _text(self, served: ServedModel, t: pb.TextParams, job_id: str) -> SequenceRequest:
        if served.info.text is None:
            raise Refused(Code.INVALID_ARGUMENT, f"model {served.name!r} is a {served.kind} model: send image params, not text")
        try:
            max_new = t.max_new_tokens if t.HasField("max_new_tokens") else self.default_new_tokens
            check_max_new_tokens(max_new, self.max_new_tokens)
            params = SamplingParams(
                temperature=t.temperature if t.HasField("temperature") else 1.0,
                top_k=t.top_k if t.HasField("top_k") else 0,
                top_p=t.top_p if t.HasField("top_p") else 1.0,
                seed=t.seed if t.HasField("seed") else None,
                max_new_tokens=max_new,
                stop=tuple(t.stop),
            )
        except InvalidRequestError as e:
            raise Refused(*status_of(e)) from None
        if not t.prompt:
            raise Refused(Code.INVALID_ARGUMENT, 'prompt is empty: send at least one character (e.g. "\\n")')
        return SequenceRequest(t.prompt, params, job_id)
