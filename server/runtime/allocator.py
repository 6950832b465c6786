"""The server process's C allocator (glibc malloc): settings that let freed memory go back to the OS.

glibc's defaults suit short programs, not a long-running server whose big buffers come and go:
freeing a large block (>= 128 KB, first served by its own mmap) raises the mmap threshold to that
size (up to 32 MB) and the trim threshold to twice it, so later KV caches, image batches, model
activations and result messages are carved from the heaps instead, and the heaps keep their freed
pages; and each thread that allocates may get its own arena (up to 8 per core), each keeping its
own free memory. What the settings save under the chaos harness: docs/reliability.md.

Nothing is done where the C library is not glibc (musl, macOS): ``mallopt`` is glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from engine.logs import get_logger

log = get_logger("server.runtime.allocator")

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 1 << 20  # blocks of 1 MB and more get their own mapping, unmapped when freed (fixed: no dynamic rise)
TRIM_THRESHOLD = 4 << 20  # free memory at a heap's top beyond this goes back to the OS
ARENA_MAX = 2  # arenas shared by every thread (the event loop, engine pool and decode threads, grpc's)


def tune_allocator() -> bool:
    """Apply the settings above to this process's malloc (call before the server starts its threads:
    arenas already made stay); False where the C library is not glibc or refused a setting."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = {M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: TRIM_THRESHOLD, M_ARENA_MAX: ARENA_MAX}
    ok = all(mallopt(param, value) == 1 for param, value in settings.items())  # mallopt returns 1 on success
    log.debug("allocator_tuned", ok=ok, mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD, arena_max=ARENA_MAX)
    return ok
