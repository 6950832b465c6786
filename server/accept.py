"""Accepting calls from grpc core ahead of need, and refusing at arrival what admission would refuse.

grpc.aio (grpcio's ``AioServer._server_main_loop``) asks grpc core for the next call of a method
only after the previous one was handed over, and each hand-over takes several turns of the event
loop: a task starts and issues ``grpc_server_request_call``, the completion comes back from the
poller thread, the task finishes, ``asyncio.wait`` wakes the main loop, which creates the handler's
task and asks again. On a busy loop each turn is long, so calls wait in grpc core's backlog, unseen.

``EagerAcceptServer`` keeps up to ``max_depth`` requests outstanding per method (grpc.aio's
``_make_request_call_future`` is the one seam: its main loop calls it for "the next call"), so
grpc core hands calls over as they arrive and the main loop's next call is usually there already.
Measured (``python -m bench.ab``, h2load, 64 Generate calls in flight, five rounds each, 2-core
VM): server/echo 0.78 median against 0.70 with grpc.aio's own accept (adaptive depth; 0.98 vs 0.81
with a fixed 16), ahead in every round. GenerateStream (one call) is unchanged.

The accepted calls wait in arrival order until the main loop takes them; an ``ArrivalPolicy``
(the service) is asked about each one as it arrives (refuse now?) and as it is handed over (it
waited this long: refuse instead?). A refusal here ends the call without reading its message or
running a handler: 54-72 us of server CPU against 138-159 us for the same refusal from the
handler (h2load, a server held shedding; server/service.py).

This relies on grpcio internals (``grpc.aio._server.cygrpc.AioServer``, its
``_make_request_call_future`` and ``_request_registered_call``, ``_send_error_status_from_server``):
``aio_server`` falls back to grpc.aio's own server, with a warning, where they are missing, and
tests/test_accept.py fails on a grpcio that moved them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grpc
from grpc._cython import cygrpc
from grpc.aio import _server as aio_server_module

from engine.logs import get_logger

log = get_logger("server.accept")

DEFAULT_DEPTH = 256  # at most this many calls asked for ahead, per method
INITIAL_DEPTH = 4  # ... starting from this many (a method seldom called keeps a few requests out)
DEFAULT_BACKLOG = 4096  # calls accepted and not yet handed to grpc.aio's main loop, per method


Refusal = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]  # code, details, trailing metadata


class ArrivalPolicy(Protocol):
    """What the accept path asks the application (server/service.py implements it)."""

    def refusal_at_arrival(self, method: bytes | None, queued: int) -> Refusal | None:
        """A call of ``method`` has come in, ``queued`` calls of it wait to be handed over: refuse it now?"""

    def refusal_at_handover(self, method: bytes | None, waited_s: float) -> Refusal | None:
        """A call waited ``waited_s`` between its arrival and its hand-over to grpc.aio: refuse it instead?"""


class _Lane:
    """The calls of one method: requests outstanding in grpc core, accepted calls in arrival order.

    ``depth`` starts small and doubles (to ``max_depth``) whenever grpc core matched every request
    outstanding (the newest one among them) before the loop could ask for more: calls were then
    waiting in core. The server's ``backlog`` bounds the calls accepted and not yet handed over;
    past it the lane stops asking, and calls wait in grpc core (bounded by ``--max-pending-calls``)
    as with grpc.aio's own accept.

    grpc's request coroutine (``_request_registered_call``: ask core, await the match, build the
    call's state) is driven here without a Task, as ``_refuse`` drives the refusal's: it awaits one
    future and is resumed from that future's callback. A Task a call was 13% of the loop's time
    under a flood (py-spy: its creation and its steps), and every call, served or refused, has one.
    """

    def __init__(self, server: EagerAcceptServer, method: bytes | None) -> None:
        self.server = server
        self.method = method
        self.loop = asyncio.get_running_loop()  # once: get_running_loop costs a getpid() syscall a call
        self.depth = min(INITIAL_DEPTH, server.max_depth)
        self.outstanding = 0  # requests made and not yet matched (or failed) by grpc core
        self.newest: asyncio.Future[Any] | None = None  # what the request made last waits on
        self.accepted: deque[tuple[Any, BaseException | None, float]] = deque()  # (call, error, when), not yet handed over
        self.waiting: asyncio.Future[Any] | None = None  # the main loop's future, when nothing was accepted yet
        self.closed = False
        if method is None:
            self._request = functools.partial(_STOCK_SERVER._request_call, server)
        else:
            self._request = functools.partial(_STOCK_SERVER._request_registered_call, server, method)

    def next(self) -> asyncio.Future[Any]:
        """grpc.aio's main loop asks for the next call of this method."""
        out: asyncio.Future[Any] = self.loop.create_future()
        out.add_done_callback(self._on_handed)
        policy = self.server.policy
        while self.accepted:
            call, error, accepted_at = self.accepted.popleft()
            if policy is not None and error is None:
                refusal = policy.refusal_at_handover(self.method, time.perf_counter() - accepted_at)
                if refusal is not None:
                    _refuse(call, refusal, self.loop)
                    continue
            _settle(out, call, error)
            break
        else:
            self.waiting = out
        self._top_up()
        return out

    def _top_up(self) -> None:
        room = self.server.backlog - len(self.accepted)
        while not self.closed and self.outstanding < min(self.depth, room) and self.server.is_running():
            request = self._request()  # grpc's own request for the next call, as a coroutine
            try:
                awaited = request.send(None)
            except StopIteration as done:  # matched at once (grpc core does not do this today)
                self.loop.call_soon(self._on_accepted, done.value, None)  # later: _on_accepted tops up again
                return
            except (Exception, asyncio.CancelledError) as error:  # e.g. the server is shutting down
                self.loop.call_soon(self._on_accepted, None, error)  # later, as a Task's failure came: no recursion
                return
            self.outstanding += 1
            self.newest = awaited
            awaited.add_done_callback(functools.partial(self._resume, request))

    def _resume(self, request: Any, awaited: asyncio.Future[Any]) -> None:
        self.outstanding -= 1
        try:
            again = request.send(None)
        except StopIteration as done:
            self._on_accepted(done.value, None)
        except (Exception, asyncio.CancelledError) as error:
            self._on_accepted(None, error)
        else:  # it waits on something else (not today's grpc): resume it from that
            self.outstanding += 1
            again.add_done_callback(functools.partial(self._resume, request))

    def _on_accepted(self, call: Any, error: BaseException | None) -> None:
        """grpc core handed over ``call`` (grpc.aio's RPCState), or the request failed with ``error``."""
        if self.closed:  # grpc.aio stopped asking: a call that still came in is told to go elsewhere
            if error is None:
                _refuse(call, SHUTTING_DOWN, self.loop)
            return
        if self.newest is not None and self.newest.done() and self.depth < self.server.max_depth:
            # grpc core matches requests in the order they were made: the newest one taken means every
            # request was, so calls were waiting in core for the loop to ask: ask for more at a time
            self.depth = min(2 * self.depth, self.server.max_depth)
        policy = self.server.policy
        if policy is not None and error is None:
            refusal = policy.refusal_at_arrival(self.method, len(self.accepted))
            if refusal is not None:
                _refuse(call, refusal, self.loop)
                self._top_up()
                return
        waiting, self.waiting = self.waiting, None
        if waiting is not None and not waiting.done():
            if policy is not None and error is None:
                policy.refusal_at_handover(self.method, 0.0)  # a sample of an empty queue (no wait: never refused)
            _settle(waiting, call, error)
        else:
            self.accepted.append((call, error, time.perf_counter()))
        self._top_up()

    def _on_handed(self, out: asyncio.Future[Any]) -> None:
        if out.cancelled():  # grpc.aio cancels its pending request at shutdown: ask for no more calls
            # The outstanding requests are not cancelled: grpc core still holds pointers into their
            # call state until it fails them itself (its shutdown does), so they must outlive that.
            self.closed = True
            while self.accepted:  # accepted, never to be handed over: tell their clients to go elsewhere
                call, error, _ = self.accepted.popleft()
                if error is None:
                    _refuse(call, SHUTTING_DOWN, self.loop)


def _settle(out: asyncio.Future[Any], call: Any, error: BaseException | None) -> None:
    if error is None:
        out.set_result(call)
    elif isinstance(error, asyncio.CancelledError):
        out.cancel()
    else:
        out.set_exception(error)


def _refuse(rpc_state: Any, refusal: Refusal, loop: asyncio.AbstractEventLoop) -> None:
    """End an accepted call with ``refusal`` without running its handler or reading its message.

    grpc's coroutine that sends the status is driven here without a Task: it awaits one future (the
    batch's completion) and is resumed from that future's callback. Under overload refusals are most
    of the loop's work, and the goodput left is what they do not use. Measured (h2load 4 x 64 in
    flight, a server held shedding, loop thread CPU per refusal): 44-46 us against 46-51 us with a
    Task and the counters' labels looked up per refusal (server/service.py caches those).
    """
    code, details, trailing_metadata = refusal
    _step(
        cygrpc._send_error_status_from_server(
            rpc_state,
            _CORE_CODES[code],
            details,
            trailing_metadata,
            cygrpc.SendInitialMetadataOperation((), 0),  # what grpc.aio sends before an error status
            loop,
        )
    )


def _step(coro: Any, _: Any = None) -> None:
    """Run ``coro`` to its next await of a future, and resume it when that future is done."""
    try:
        awaited = coro.send(None)
    except StopIteration:
        return
    except (Exception, asyncio.CancelledError):  # the client may be gone already: nothing to tell it
        return
    awaited.add_done_callback(functools.partial(_step, coro))


_CORE_CODES = {code: code.value[0] for code in grpc.StatusCode}

SHUTTING_DOWN: Refusal = (grpc.StatusCode.UNAVAILABLE, "server is shutting down; send the request to another server", ())


_STOCK_SERVER = cygrpc.AioServer


class EagerAcceptServer(cygrpc.AioServer):  # type: ignore[misc]
    """grpc.aio's server asking grpc core for calls ahead of need, per method (see the module's doc)."""

    max_depth = DEFAULT_DEPTH
    backlog = DEFAULT_BACKLOG
    policy: ArrivalPolicy | None = None

    def _make_request_call_future(self, method_bytes: bytes | None) -> asyncio.Future[Any]:
        lanes: dict[bytes | None, _Lane] = self.__dict__.setdefault("_lanes", {})
        lane = lanes.get(method_bytes)
        if lane is None:
            lane = lanes[method_bytes] = _Lane(self, method_bytes)
        return lane.next()

    def queued(self) -> dict[str, int]:
        """Calls accepted and not yet handed over, by method (for tests)."""
        lanes: dict[bytes | None, _Lane] = self.__dict__.get("_lanes", {})
        return {(m or b"").decode(): len(lane.accepted) for m, lane in lanes.items()}


def supported() -> bool:
    """grpc.aio's internals this module uses are where it expects them."""
    if getattr(getattr(aio_server_module, "cygrpc", None), "AioServer", None) is not _STOCK_SERVER:  # grpc.aio builds from it
        return False
    methods = ("_make_request_call_future", "_request_registered_call", "_request_call", "is_running")
    functions = ("_send_error_status_from_server", "SendInitialMetadataOperation")
    return all(hasattr(cygrpc.AioServer, name) for name in methods) and all(hasattr(cygrpc, name) for name in functions)


@contextlib.contextmanager
def _building_with(cls: type) -> Iterator[None]:
    original = aio_server_module.cygrpc.AioServer
    aio_server_module.cygrpc.AioServer = cls
    try:
        yield
    finally:
        aio_server_module.cygrpc.AioServer = original


def aio_server(
    *, options: Sequence[tuple[str, Any]], interceptors: Sequence[Any] | None = None, accept_ahead: int = DEFAULT_DEPTH,
    backlog: int = DEFAULT_BACKLOG,
) -> grpc.aio.Server:  # fmt: skip
    """``grpc.aio.server(...)``, asking grpc core for up to ``accept_ahead`` calls ahead per method (1:
    grpc.aio's own way), and holding at most ``backlog`` accepted calls per method for its main loop."""
    if accept_ahead <= 1 or not supported():
        if accept_ahead > 1:
            log.warning("accept_ahead_unavailable", grpcio=grpc.__version__, reason="grpc.aio internals differ")
        return grpc.aio.server(interceptors=interceptors, options=options)
    cls = type("EagerAcceptServer", (EagerAcceptServer,), {"max_depth": accept_ahead, "backlog": backlog})
    with _building_with(cls):
        return grpc.aio.server(interceptors=interceptors, options=options)


def set_policy(server: grpc.aio.Server, policy: ArrivalPolicy | None) -> bool:
    """Ask ``policy`` about each call as it arrives and as it is handed over; False where the server
    does not accept ahead (grpc.aio's own accept path has no place for it)."""
    core = getattr(server, "_server", None)
    if not isinstance(core, EagerAcceptServer):
        return False
    core.policy = policy
    return True
