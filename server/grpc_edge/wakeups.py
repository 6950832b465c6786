"""grpc core hands completions to the event loop as fast as they come, however many the loop takes per turn.

grpc.aio's ``PollerCompletionQueue`` (one per process) has a poller thread that queues each
completion and writes one byte to a socketpair; the loop's reader reads one byte, then runs every
completion queued. Under load the bytes pile up, and once the socket is full the poller thread
blocks in ``write``: grpc core then hands over about one completion per turn of the loop, and new
calls wait in its backlog, unseen by admission, until grpc drops them as CANCELLED.
``unblock_completion_writes`` makes the write side non-blocking. A write into a full socket then
fails at once (grpc ignores its result), which loses nothing: the loop has hundreds of wake-ups
still to come, and each runs every completion queued by then.

This relies on grpcio internals (a ``cygrpc.PollerCompletionQueue`` holding its two sockets). Where
they are not found it does nothing, with a warning; grpcio versions that already coalesce wake-ups
(an eventfd) have no socket to change. The wake-up tests fail on a grpcio that moved them.

Why, and its price: docs/design/wakeups.md
"""

from __future__ import annotations

import gc
import socket
import weakref

from grpc._cython import cygrpc

from engine.logs import get_logger

log = get_logger("server.grpc_edge.wakeups")

_unblocked: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # write sockets already changed (they may be frozen by now)


def _write_sockets() -> list[socket.socket]:
    """The write end of each live completion queue's socketpair: the socket grpc's loop binding does not read."""
    queue_type = getattr(cygrpc, "PollerCompletionQueue", None)
    bound_type = getattr(cygrpc, "_BoundEventLoop", None)
    if queue_type is None or bound_type is None:
        return []
    queues, read_sockets = [], set()
    for obj in gc.get_objects():  # once per server start; frozen objects (gc.freeze) are not listed
        if type(obj) is queue_type:
            queues.append(obj)
        elif type(obj) is bound_type:
            read_sockets.add(id(getattr(obj, "read_socket", None)))
    found = []
    for queue in queues:
        sockets = [s for s in gc.get_referents(queue) if isinstance(s, socket.socket) and s.fileno() != -1]
        writers = [s for s in sockets if id(s) not in read_sockets]
        if len(sockets) == 2 and len(writers) == 1:  # a read end the loop watches, and the other end
            found.append(writers[0])
    return found


def unblock_completion_writes() -> bool:
    """Make grpc's completion wake-ups never block the poller thread (see the module's doc); call it once
    a grpc.aio object exists (its completion queue and the loop's binding do). False, with a warning,
    where grpc.aio's internals are not as expected."""
    writers = _write_sockets()
    for writer in writers:
        writer.setblocking(False)
        _unblocked.add(writer)
    if writers or any(s.fileno() != -1 for s in _unblocked):
        return True
    log.warning("completion_writes_unchanged", reason="grpc.aio internals differ: no completion queue socketpair found")
    return False
