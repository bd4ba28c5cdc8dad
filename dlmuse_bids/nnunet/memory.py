"""Keep freed memory in the process while tiles run, so that each pass does not fault in fresh
pages; hand it back after.

A full-width tile allocates tensors of hundreds of MB (a 32-channel fp32 feature map of DLICV's
160x128x112 tile is 294 MB). glibc serves every allocation over 32 MB with its own ``mmap`` and
returns it to the kernel on ``free``, so each new tensor is fresh memory whose every 4 KiB page
the kernel must fault in and zero on first touch: 2.4 million faults and 5.4 s of system time
for two 152-class DLMUSE passes on the benchmark machine, 30 % of their time. Keeping freed
memory changes no arithmetic (outputs are bit-identical).

:func:`freed_memory_kept` is a block inside which glibc serves large blocks from its heap and
keeps what is freed there for the next allocations; the sliding window runs its tiles inside
one, after allocating the tensors that outlive them (the logits, the one buffer every tile's
mirror sum goes to), so that the heap holds only what each pass allocates and frees again in
the same pattern. On leaving, glibc's defaults come back (its mmap threshold fixed at the
initial 128 KiB) and every free page is returned. Process-wide while it lasts, like torch's
thread count.

:func:`one_arena` makes every thread allocate from glibc's main arena, for good; the predictor
calls it when it is made, before its threads first allocate (glibc fixes its arena limit then).

:func:`release_freed_memory` hands back to the kernel every whole free page that glibc still
holds (``malloc_trim``), in every arena: after each prediction, so that what one network freed
is not resident under the next one's peak. Elsewhere than glibc (musl, macOS, Windows) both do
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1
# glibc's defaults (malloc.c: DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024

#: inside freed_memory_kept: no mmap, no trimming (and one arena: one_arena)
_KEEP = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
#: after it: glibc's defaults for the last two, and its initial mmap threshold. Setting the trim
#: threshold froze glibc's dynamic mmap threshold wherever freed mappings had raised it (up to
#: 32 MB); left there, the arrays made between two networks (masks, crops, the next network's
#: input, 4-30 MB) came from the heap the last tiles kept and pinned it, and the next network's
#: tiles grew the heap around them (the mirrored pipeline's peak on sub-otsu: 3.46-3.49 GiB, and
#: 2.98-3.29 GiB with the threshold put back)
_DEFAULTS = (
    (_M_MMAP_MAX, _DEFAULT_MMAP_MAX),
    (_M_TRIM_THRESHOLD, _DEFAULT_TRIM),
    (_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD),
)

_depth = 0  # freed_memory_kept blocks entered and not left, in all threads
_lock = threading.Lock()


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


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Inside the block, glibc's malloc keeps freed blocks for the next allocations; yields
    whether it does (False where the C library is not glibc).

    No ``mmap`` for large blocks (they come from the heap), no trimming of the heap, and one
    arena (:func:`one_arena`), so that the blocks one pass frees serve the next pass's
    allocations, whatever thread makes them. On leaving the last block open in the process,
    glibc's defaults for large blocks and trimming are back and every free page goes back to
    the kernel (:func:`release_freed_memory`). The arena limit stays (:func:`one_arena`). The
    mmap threshold is fixed at glibc's initial 128 KiB after the block, no longer raised by
    freed mappings.
    """
    global _depth
    libc = _glibc()
    if libc is None:
        logger.debug("not glibc: freed memory is returned to the system as usual")
        yield False
        return
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    with _lock:
        if _depth == 0:
            one_arena()
            for param, value in _KEEP:
                mallopt(param, value)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for param, value in _DEFAULTS:
                    mallopt(param, value)
                release_freed_memory()


def one_arena() -> bool:
    """Have every thread of the process allocate from glibc's main arena; True where glibc took
    the setting.

    glibc fixes its arena limit the first time a thread other than the first needs an arena, so
    this acts only if no thread has allocated yet; after that it changes nothing. In a thread's
    own arena, a block over 64 MB is always a mapping of its own, unmapped on free, whatever
    :func:`freed_memory_kept` says: the passes that run in pool threads (DLICV's, several at
    once) faulted in 1.1 million fresh pages a prediction without it, 0.2 million with it (2 s
    of a 25 s unmirrored DLICV; mirrored, 7.8 million and 18 s of system time against 0.3
    million and 2 s). Threads then share one lock for their ``malloc`` calls. Does nothing
    (False) where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc.mallopt(_M_ARENA_MAX, 1) == 1


def release_freed_memory() -> bool:
    """Return glibc's free pages, in every arena, to the kernel; True when any were returned.

    Does nothing (False) where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc.malloc_trim(0) == 1
