"""Keep freed memory in the process, so that each tile's tensors do not fault in fresh pages.

A full-width tile allocates tensors of hundreds of MB (a 32-channel fp32 feature map of DLICV's
160x128x112 tile is 294 MB). glibc serves every allocation over 32 MB with its own ``mmap`` and
returns it to the kernel on ``free``, so each new tensor is fresh memory whose every 4 KiB page
the kernel must fault in and zero on first touch: on the benchmark machine that was a third of a
bf16 tile's time. Retaining freed memory changes no arithmetic (outputs are bit-identical).

:func:`retain_freed_memory` asks glibc to serve large blocks from its heap and never to trim
it. It is process-wide, so an application calls it (once per process that runs networks), not
the engine. Elsewhere (musl, macOS, Windows) it does nothing and says so.

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
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has mallopt as a stub)
    except (OSError, AttributeError):
        logger.debug("not glibc: freed memory is returned to the system as usual")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(
        mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    )
    _done = ok
    logger.debug("glibc malloc retains freed memory: %s", ok)
    return ok
