"""The books: one entry per request, with its deadline and its one terminal outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from tests.chaos.config import Kind, Probe, Rpc


@dataclass(eq=False, slots=True)
class Req:
    id: str
    model: str
    kind: Kind
    rpc: Rpc
    sent: float  # time.monotonic()
    deadline: float
    probe: Probe = ""
    admitted: float | None = None  # when the server admitted it (None: refused, or never reached the server)
    server_deadline: float | None = None  # the deadline the server gave it at admission
    ended: float | None = None
    outcome: str | None = None
    outcomes: int = 0
    touched: set[str] = field(default_factory=set)

    @property
    def due(self) -> float:
        """Its deadline: the server's (admission + timeout) once admitted, else the client's (send + timeout)."""
        return self.server_deadline if self.server_deadline is not None else self.deadline


class Ledger:
    def __init__(self) -> None:
        self.reqs: dict[str, Req] = {}
        self.duplicates = 0
        self.duplicate_examples: list[str] = []

    def new(self, id: str, model: str, kind: Kind, rpc: Rpc, timeout: float) -> Req:
        now = time.monotonic()
        req = Req(id, model, kind, rpc, now, now + timeout)
        self.reqs[id] = req
        return req

    def end(self, req: Req, outcome: str) -> None:
        req.outcomes += 1
        if req.outcomes == 1:
            req.outcome = outcome
            req.ended = time.monotonic()
        else:
            self.duplicate(f"{req.id}: second outcome {outcome} after {req.outcome}")

    def duplicate(self, what: str) -> None:
        self.duplicates += 1
        if len(self.duplicate_examples) < 5:
            self.duplicate_examples.append(what)


def code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return f"CODE_{code}"
