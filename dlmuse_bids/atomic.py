"""Atomic writes: a final name is only ever absent, its old content, or the whole new content.

Part of the core (standard library only). A file is written under a hidden temporary name in
its own folder, fsynced and renamed; a writer killed half-way leaves only the temporary, which
:func:`leftover_temporaries` finds for the next writer of that file to remove.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from pathlib import Path

_WRITE_CHUNK = 1 << 20


def write_bytes_atomic(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a hidden temporary file, fsync, and rename.

    ``path`` is only ever absent, its old content, or the whole new content; its directory must
    exist.
    """
    _write_atomic(Path(path), payload)


def _temporary_name(final: Path, token: str) -> str:
    return f".{final.name[:64]}.{token}.tmp"


def leftover_temporaries(final: str | os.PathLike[str]) -> list[Path]:
    """The hidden temporaries of ``final`` that a killed writer left behind.

    Only a writer of ``final`` itself may remove them (a job re-running the image): another
    process writing ``final`` at the same moment would lose its file.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = glob.escape(_temporary_name(final, "")[:-4]) + "?" * 12 + ".tmp"
    return sorted(final.parent.glob(pattern))


def _write_atomic(final: Path, payload: bytes) -> None:
    tmp = final.parent / _temporary_name(final, secrets.token_hex(6))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view[:_WRITE_CHUNK]) :]
            os.fsync(fd)
        except OSError as exc:
            if exc.filename is not None:
                raise
            # os.write names no file: name the output, not its hidden temporary
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(final.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; best effort, as not every platform can open a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
