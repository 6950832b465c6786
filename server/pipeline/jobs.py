"""A request inside the server: a message with a status (Broadway's model).

Every admitted request becomes one ``Job``. Stages pass jobs along; whatever happens (a result, a
user error, a crashed stage, a passed deadline, a client that went away) ends in exactly one call
of ``Job.finish``: the first one wins, later ones are no-ops. Work for a job that has finished is
dropped by the next stage that sees it (``job.done``), so cancelled and expired requests cost no
model time once they leave the queue.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from engine import ImageChunk, ImageRequest, ImageResult, SequenceRequest, ServedModel, TokenEvent
from server.pipeline.statuses import Code

if TYPE_CHECKING:
    from engine import Ticket
Reason = Literal["complete", "length", "stop", "error"]


class Rpc(enum.StrEnum):
    """How a request came in: its label in metrics and logs, and how admission treats it."""

    GENERATE = "Generate"  # one gRPC call a request: admitted by queueing delay and the call limit
    GENERATE_STREAM = "GenerateStream"  # many a stream: admitted by the stream's credit
    AMQP = "Amqp"  # from the RabbitMQ queue: admitted by queueing delay (prefetch is its credit)
    HTTP = "Http"  # the OpenAI-compatible HTTP edge: admitted by queueing delay


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended: OK with a finish reason, or a gRPC status code and a message."""

    code: Code = Code.OK
    message: str = ""
    reason: Reason = "complete"

    @property
    def ok(self) -> bool:
        return self.code == Code.OK

    @classmethod
    def error(cls, code: Code, message: str) -> Outcome:
        return cls(code, message, "error")


# One shared value for every image job that completes (Outcome is frozen): none made per request.
COMPLETE = Outcome()


class Recipient(Protocol):
    """The caller's side of a job: where its chunks and its one terminal outcome go."""

    def emit(self, job: Job, item: ImageResult | TokenEvent) -> None: ...

    def finish(self, job: Job, outcome: Outcome) -> None: ...


@dataclass(eq=False, slots=True, weakref_slot=True)  # weakly referable: tests check finished jobs are freed
class Job:
    id: str
    rpc: Rpc
    served: ServedModel
    recipient: Recipient  # where its chunks and outcome go: one call's queue, or a stream's outbox
    deadline: float  # on the event loop's clock
    image: ImageRequest | None = None
    text: SequenceRequest | None = None
    created: float = field(default_factory=time.perf_counter)
    done: bool = False
    outcome: Outcome | None = None
    chunks: list[ImageChunk] = field(default_factory=list)  # prepared image work, at most a batch each
    seed: int = 0  # the seed used (drawn when the request gave none)
    sent: int = 0  # samples or tokens delivered
    ticket: Ticket | None = None  # text: the sequence in its model's decode batch (cancel with it)
    tick: int = 0  # the deadline's slot in the pipeline's timing wheel (0: none)
    on_finish: Callable[[Job], None] | None = None  # the pipeline's bookkeeping (in-flight set, metrics)

    @property
    def kind(self) -> Literal["image", "text"]:
        return "image" if self.image is not None else "text"

    def emit(self, item: ImageResult | TokenEvent) -> None:
        """Deliver one chunk (images) or token (text) to the caller, unless the job has ended."""
        if not self.done:
            self.recipient.emit(self, item)

    def finish(self, outcome: Outcome) -> bool:
        """End the job with ``outcome``; True if this call ended it (only the first one does)."""
        if self.done:
            return False
        self.done = True
        self.outcome = outcome
        if self.ticket is not None and not outcome.ok:
            self.ticket.cancel()  # leaves the decode batch at its next step, freeing its cache
        # Drop what the job no longer needs: a finished job can outlive its request inside a
        # reference cycle (an exception's traceback, say), and must not keep latents or a dead
        # decode thread's KV cache alive with it until the cyclic collector runs.
        self.ticket = None
        self.chunks = []
        if self.on_finish is not None:
            self.on_finish(self)
        self.recipient.finish(self, outcome)
        return True

    def fail(self, code: Code, message: str) -> bool:
        return self.finish(Outcome.error(code, message))
