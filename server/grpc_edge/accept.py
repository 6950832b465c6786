"""Accepting calls from grpc core ahead of need, starting their handlers at once, and refusing at
arrival what admission would refuse.

grpc.aio asks grpc core for one call of a method at a time and hands each over through its main
loop, two or more turns of the event loop a call. ``EagerAcceptServer`` keeps up to ``max_depth``
requests outstanding per method (grpc.aio's ``_make_request_call_future`` is the one seam) and
starts each registered method's call where it is accepted, as grpc.aio's main loop would; that
main loop hears only of failed requests and of an unregistered method's calls. An
``ArrivalPolicy`` (the service) may refuse a call as it arrives or as its task starts, without
reading its message or running a handler.

This relies on grpcio internals (``cygrpc.AioServer``, its ``_make_request_call_future``,
``_request_registered_call`` and handler registration, ``_send_error_status_from_server``,
``_handle_rpc``, ``_schedule_rpc_coro``, ``_MethodResolver``): ``aio_server`` falls back to
grpc.aio's own server, with a warning, where they are missing, and the accept tests fail on a
grpcio that moved them.

Why: docs/design/accept-ahead.md
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc
from grpc._cython import cygrpc
from grpc.aio import _server as aio_server_module

from engine.logs import get_logger
from server.config import ServerConfig
from server.grpc_edge.codes import GRPC_CODES
from server.pipeline import statuses

log = get_logger("server.grpc_edge.accept")

_DEFAULTS = ServerConfig()  # the settings' defaults are the only ones
DEFAULT_DEPTH = _DEFAULTS.accept_ahead  # at most this many calls asked for ahead, per method (--accept-ahead)
INITIAL_DEPTH = 4  # ... starting from this many (a method seldom called keeps a few requests out)
DEFAULT_BACKLOG = _DEFAULTS.max_pending_calls  # calls accepted and not yet handed to grpc.aio's main loop, per method


Refusal = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]  # code, details, trailing metadata


def grpc_server_options(max_streams_per_connection: int, max_pending_calls: int) -> list[tuple[str, int]]:
    """grpc core settings for the calls the application has not picked up yet.

    grpc core holds them in a backlog; past ``grpc.server.max_pending_requests`` (grpc's default
    1000, then random early drop up to the hard limit, 3000) it ends them itself, as CANCELLED,
    unseen by admission and by the metrics. ``max_pending_calls`` bounds it (the hard limit twice
    it) for floods faster than the loop can even refuse (docs/design/accept-ahead.md).
    The HTTP/2 stream limit per connection (SETTINGS_MAX_CONCURRENT_STREAMS) bounds it per client
    instead: a gRPC client waits for a free stream rather than sending (0: grpc's default, no limit).
    """
    options = [
        ("grpc.server.max_pending_requests", max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending_calls),
    ]
    if max_streams_per_connection:
        options.append(("grpc.max_concurrent_streams", max_streams_per_connection))
    return options


class ArrivalPolicy(Protocol):
    """What the accept path asks the application (server/grpc_edge/service.py implements it)."""

    def refusal_at_arrival(self, method: bytes | None, in_progress: int, queued_s: float) -> Refusal | None:
        """A call of ``method`` has come in; ``in_progress`` calls of it were started and have not
        finished (less those released: ``release_call``); the oldest of them not running yet has
        waited ``queued_s`` (0: none waits). Refuse it now?"""

    def refusal_at_handover(self, method: bytes | None, waited_s: float) -> Refusal | None:
        """A call is about to start, ``waited_s`` after it was accepted (the event loop's queue in front of
        it): refuse it instead?"""


class _Lane:
    """The calls of one method: requests outstanding in grpc core, and the calls started from here.

    ``depth`` starts small and doubles (to ``max_depth``) whenever grpc core matched every request
    outstanding before the loop could ask for more: calls were then waiting in core. ``started``
    holds the calls started here whose task has not run its first step yet (the loop's own queue);
    past the server's ``backlog`` of those the lane stops asking, and calls wait in grpc core
    (bounded by ``--max-pending-calls``).

    Each accepted call is started here (``_handle_rpc`` under ``_schedule_rpc_coro``, in a Task),
    not handed to grpc.aio's main loop. That loop still gets this lane's future (``next``): it hears
    of a failed request (and re-asks) and of the generic lane's calls, and cancels the future at
    shutdown. grpc's request coroutine (``_request_registered_call``) is driven without a Task of
    its own, resumed from the callback of the one future it awaits: every call, served or refused,
    would pay for that Task (docs/design/accept-ahead.md).
    """

    def __init__(self, server: EagerAcceptServer, method: bytes | None) -> None:
        self.server = server
        self.method = method
        self.name = None if method is None else method.decode()  # None: the generic lane (handed to grpc.aio's main loop)
        self.loop = asyncio.get_running_loop()  # once: get_running_loop costs a getpid() syscall a call
        self.depth = min(INITIAL_DEPTH, server.max_depth)
        self.outstanding = 0  # requests made and not yet matched (or failed) by grpc core
        self.newest: asyncio.Future[Any] | None = None  # what the request made last waits on
        self.started: deque[_Slot] = deque()  # the calls started here whose task has not run yet, oldest first
        self.active = 0  # calls started here and not finished, less those released (release_call)
        self.handover: deque[tuple[Any, BaseException | None]] = deque()  # for grpc.aio's main loop: failed requests (generic calls)
        self.waiting: asyncio.Future[Any] | None = None  # the main loop's future
        self.closed = False
        if method is None:
            self._request = functools.partial(_STOCK_SERVER._request_call, server)
        else:
            self._request = functools.partial(_STOCK_SERVER._request_registered_call, server, method)

    def next(self) -> asyncio.Future[Any]:
        """grpc.aio's main loop asks for the next call of this method: it hears of failed requests, and of the
        generic lane's calls (an unregistered method's name is in the call's state, out of Python's reach)."""
        out: asyncio.Future[Any] = self.loop.create_future()
        out.add_done_callback(self._on_handed)
        if self.handover:
            _settle(out, *self.handover.popleft())
        else:
            self.waiting = out
        self._top_up()
        return out

    def _top_up(self) -> None:
        room = self.server.backlog - len(self.started)
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
        if error is not None or self.name is None:  # for grpc.aio's main loop: it re-asks after a failed request, or stops
            waiting, self.waiting = self.waiting, None
            if waiting is not None and not waiting.done():
                _settle(waiting, call, error)
            else:
                self.handover.append((call, error))
            self._top_up()
            return
        policy = self.server.policy
        now = time.perf_counter()
        started = self.started
        if policy is not None:
            refusal = policy.refusal_at_arrival(self.method, self.active, now - started[0].accepted_at if started else 0.0)
            if refusal is not None:
                _refuse(call, refusal, self.loop)
                self._top_up()
                return
        slot = _Slot(self, now)
        started.append(slot)
        task = self.loop.create_task(self._serve(call, slot), name="rpc_task")
        tasks = self.server.rpc_tasks
        tasks.add(task)  # the loop holds only a weak reference to a task
        task.add_done_callback(tasks.discard)
        task.add_done_callback(slot.ended)
        self._top_up()

    async def _serve(self, call: Any, slot: _Slot) -> None:
        """What grpc.aio's main loop starts for a call, after asking the policy about its wait. The loop runs
        tasks in the order they were made: this call is the oldest in ``started``."""
        slot.leave()
        _CALL.set(slot)  # this task's context: the handler's task copies it (release_call)
        server = self.server
        policy = server.policy
        if policy is not None:
            refusal = policy.refusal_at_handover(self.method, time.perf_counter() - slot.accepted_at)
            if refusal is not None:
                _refuse(call, refusal, self.loop)
                return
        rpc = _handle_rpc(self.name, server.resolver(), server.interceptors, call, self.loop, False)
        await _schedule_rpc_coro(rpc, call, self.loop, self.name)

    def _on_handed(self, out: asyncio.Future[Any]) -> None:
        if out.cancelled():  # grpc.aio cancels its pending request at shutdown: ask for no more calls
            # The outstanding requests are not cancelled: grpc core still holds pointers into their
            # call state until it fails them itself (its shutdown does), so they must outlive that.
            self.closed = True
            while self.handover:  # accepted, never to be handed over: tell their clients to go elsewhere
                call, error = self.handover.popleft()
                if error is None:
                    _refuse(call, SHUTTING_DOWN, self.loop)


class _Slot:
    """A call started by a lane: its place in the lane's queue of calls not yet run (``started``) and
    among its calls in progress (``active``), each given back once."""

    __slots__ = ("accepted_at", "lane", "owner", "waiting")

    def __init__(self, lane: _Lane, accepted_at: float) -> None:
        lane.active += 1
        self.owner = lane
        self.lane: _Lane | None = lane  # None once released
        self.accepted_at = accepted_at
        self.waiting = True  # in ``owner.started``

    def leave(self) -> None:
        """The call's task runs (or ended without running): it leaves the queue, usually as its oldest."""
        if self.waiting:
            self.waiting = False
            started = self.owner.started
            if started[0] is self:
                started.popleft()
            else:
                started.remove(self)

    def release(self) -> None:
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.active -= 1

    def ended(self, task: asyncio.Future[Any]) -> None:
        self.leave()  # a task cancelled before it ran (the loop closing) must not stay queued
        self.release()


_CALL: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("genserve_accept_call", default=None)


def release_call() -> None:
    """The running call stops counting among its method's calls in progress (the count the arrival
    policy is given): a call that lasts long for its own reasons, not for the server's load (a text
    stream), must not hold back the short ones. Nothing happens outside a call started here."""
    slot = _CALL.get()
    if slot is not None:
        slot.release()


def _settle(out: asyncio.Future[Any], call: Any, error: BaseException | None) -> None:
    if error is None:
        out.set_result(call)
    elif isinstance(error, asyncio.CancelledError):
        out.cancel()
    else:
        out.set_exception(error)


def _refuse(rpc_state: Any, refusal: Refusal, loop: asyncio.AbstractEventLoop) -> None:
    """End an accepted call with ``refusal`` without running its handler or reading its message.

    grpc's coroutine that sends the status is driven without a Task (``_step``): under overload
    refusals are most of the loop's work, and the goodput left is what they do not use.
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

SHUTTING_DOWN: Refusal = (GRPC_CODES[statuses.SHUTTING_DOWN[0]], statuses.SHUTTING_DOWN[1], ())


_STOCK_SERVER = cygrpc.AioServer
_handle_rpc: Any = getattr(cygrpc, "_handle_rpc", None)  # how grpc.aio's main loop starts a call (checked by supported())
_schedule_rpc_coro: Any = getattr(cygrpc, "_schedule_rpc_coro", None)


class EagerAcceptServer(cygrpc.AioServer):  # type: ignore[misc]
    """grpc.aio's server asking grpc core for calls ahead of need, per method, and starting each call's
    handler as it is accepted (see the module's doc)."""

    max_depth = DEFAULT_DEPTH
    backlog = DEFAULT_BACKLOG
    policy: ArrivalPolicy | None = None
    interceptors: tuple[Any, ...] = ()  # the server's, as grpc.aio gives them to its own main loop

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Any) -> None:
        super().add_generic_rpc_handlers(generic_rpc_handlers)
        self.__dict__.setdefault("_generic_handlers", []).extend(generic_rpc_handlers)

    def add_registered_method_handlers(self, method_handlers: dict[str, Any]) -> None:
        super().add_registered_method_handlers(method_handlers)
        if not self.is_running():  # grpc.aio refuses (with a warning) what comes after the start
            self.__dict__.setdefault("_registered_handlers", {}).update(method_handlers)

    def resolver(self) -> Any:
        """grpc.aio's handler lookup over the same handlers its main loop would use (built at the first call)."""
        resolver = self.__dict__.get("_resolver")
        if resolver is None:
            generic = self.__dict__.setdefault("_generic_handlers", [])
            registered = self.__dict__.setdefault("_registered_handlers", {})
            resolver = self.__dict__["_resolver"] = cygrpc._MethodResolver(generic, registered)
        return resolver

    @property
    def rpc_tasks(self) -> set[asyncio.Task[None]]:
        """The calls' tasks, held until done (the loop keeps only weak references)."""
        tasks: set[asyncio.Task[None]] | None = self.__dict__.get("_rpc_tasks")
        if tasks is None:
            tasks = self.__dict__["_rpc_tasks"] = set()
        return tasks

    def _make_request_call_future(self, method_bytes: bytes | None) -> asyncio.Future[Any]:
        lanes: dict[bytes | None, _Lane] = self.__dict__.setdefault("_lanes", {})
        lane = lanes.get(method_bytes)
        if lane is None:
            lane = lanes[method_bytes] = _Lane(self, method_bytes)
        return lane.next()


def supported() -> bool:
    """grpc.aio's internals this module uses are where it expects them."""
    if getattr(getattr(aio_server_module, "cygrpc", None), "AioServer", None) is not _STOCK_SERVER:  # grpc.aio builds from it
        return False
    methods = (
        "_make_request_call_future", "_request_registered_call", "_request_call", "is_running", "add_generic_rpc_handlers",
        "add_registered_method_handlers",
    )  # fmt: skip
    functions = ("_send_error_status_from_server", "SendInitialMetadataOperation", "_handle_rpc", "_schedule_rpc_coro", "_MethodResolver")
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
    attributes = {"max_depth": accept_ahead, "backlog": backlog, "interceptors": tuple(interceptors or ())}
    cls = type("EagerAcceptServer", (EagerAcceptServer,), attributes)
    with _building_with(cls):
        return grpc.aio.server(interceptors=interceptors, options=options)


def calls_in_progress(server: grpc.aio.Server, method: bytes) -> Callable[[], int]:
    """How many calls of ``method`` were started here and have not had their outcome (the count the
    arrival policy is given): those accepted and not yet admitted too, which no pipeline count sees
    yet. Always 0 where the server does not accept ahead."""
    core = getattr(server, "_server", None)
    if not isinstance(core, EagerAcceptServer):
        return lambda: 0
    lanes: dict[bytes | None, _Lane] = core.__dict__.setdefault("_lanes", {})

    def count() -> int:
        lane = lanes.get(method)
        return 0 if lane is None else lane.active

    return count


def set_policy(server: grpc.aio.Server, policy: ArrivalPolicy | None) -> bool:
    """Ask ``policy`` about each call as it arrives and as it is handed over; False where the server
    does not accept ahead (grpc.aio's own accept path has no place for it)."""
    core = getattr(server, "_server", None)
    if not isinstance(core, EagerAcceptServer):
        return False
    core.policy = policy
    return True
