"""Keep freed memory in the process, so that each tile's tensors do not fault in fresh pages.

A full-width tile allocates tensors of hundreds of MB (a 32-channel fp32 feature map of DLICV's
160x128x112 tile is 294 MB). glibc serves every allocation over 32 MB with its own ``mmap`` and
returns it to the kernel on ``free``, so each new tensor is fresh memory whose every 4 KiB page
the kernel must fault in and zero on first touch: on the benchmark machine that was a third of a
bf16 tile's time. Retaining freed memory changes no arithmetic (outputs are bit-identical).

:func:`retain_freed_memory` asks glibc to serve large blocks from its heap and never to trim
it. It is process-wide, so an application calls it (once per process that runs networks), not
the engine. Elsewhere (musl, macOS, Windows) it does nothing and says so.

:func:`release_freed_memory` is the opposite, for one moment: after a network's prediction it
hands back to the kernel every whole free page that glibc still holds (``malloc_trim``), in
every arena. Without it, the pages DLICV's tiles freed in its worker threads' arenas stay
resident (0.2-0.3 GiB measured) while DLMUSE allocates its own, and add to the run's peak. The
predictor calls it after each prediction unless :func:`retain_freed_memory` is in force.

Not switched on by the commands yet: on the benchmark machine it made the no-TTA pipeline 1.6x
faster (192 -> 120 s on a 1 mm head) but raised its peak RSS from 3.0 to 4.5 GiB, because blocks
of many sizes fragment one heap where separate mappings did not. ``benchmarks/compare_engines.py
--retain-memory`` measures it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_done: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has mallopt as a stub)
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse; True when it now does.

    No ``mmap`` for large blocks (they come from the heap), no trimming of the heap's top, and
    one arena, so that blocks freed by one thread serve the next tile's allocations whatever
    thread makes them. Idempotent; returns False where the C library is not glibc.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    libc = _glibc()
    if libc is None:
        logger.debug("not glibc: freed memory is returned to the system as usual")
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(
        mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    )
    _done = ok
    logger.debug("glibc malloc retains freed memory: %s", ok)
    return ok


def release_freed_memory() -> bool:
    """Return glibc's free pages, in every arena, to the kernel; True when any were returned.

    Does nothing (False) where the C library is not glibc, or where :func:`retain_freed_memory`
    made this process keep its freed memory on purpose.
    """
    if _done:
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc.malloc_trim(0) == 1
