"""grpc core hands completions to the event loop as fast as they come, however many the loop takes per turn.

grpcio 1.85's ``PollerCompletionQueue`` (grpc.aio's bridge from grpc core to asyncio; one per process)
has a poller thread that pushes each completion onto a C++ queue and writes one byte to a
socketpair; the loop's reader (``_handle_events``) reads one byte, then runs every completion
queued. Under load the loop runs several completions per byte read, so the bytes pile up. Once the
socket's send buffer is full (~277 one-byte writes), the poller thread blocks in ``write`` until the
loop reads one more byte. From then on grpc core hands over about one completion per turn of the
loop. Every hop of every call waits a turn, and new calls wait in grpc core's backlog, where
admission cannot see them and grpc drops them as CANCELLED when it overflows.

Measured (h2load, one-image VAE calls, 2-core VM): under 4 x 2,500 calls/s the write side's
Send-Q sat at its limit (``ss -x``: 212,736 bytes). ``bench.serve --quick``, 5 s at 2x the
server's maximum: grpc core ended 12,771 calls as CANCELLED before this change and none after
(30,770 refused by admission, goodput 0.80 of the maximum, RSS +17 MB against +177). The bare echo
(stock grpc.aio) in the same run: 36,723 of 60,860 ended by grpc core.

The price, measured side by side (``bench.ab``, and one server at a time with h2load at 64 calls in
flight): a closed loop that never overloads the server ran 10-17% slower than with the poller
throttled (4,000-4,600 against 4,800-5,500 calls/s, same batch sizes). Discarding the wake-up
bytes in the loop's reader instead (the poller then never meets a full socket) cost the same; the
cause is not pinned down (the second vCPU now also runs the poller thread's wake-ups).

``unblock_completion_writes`` makes the poller's write side non-blocking. A write into a full buffer
then fails at once (grpc ignores its result), which loses nothing: the buffer is full, so the loop
has hundreds of wake-ups still to come, and each runs every completion queued by then.

This relies on grpcio internals (a ``cygrpc.PollerCompletionQueue`` holding its two sockets). Where
they are not found it does nothing, with a warning; grpcio versions that already coalesce wake-ups
(an eventfd) have no socket to change. tests/test_wakeups.py fails on a grpcio that moved them.
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
