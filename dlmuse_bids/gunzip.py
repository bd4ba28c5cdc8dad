"""Bounded decompression of a gzip file held in memory.

Part of the core (standard library only). A small file must not expand without bound (a gzip
bomb, or a header claiming 10^12 voxels): the stream is decompressed in steps, first a head
from which the caller learns how many bytes the file claims, then those bytes, then the rest of
the stream (checked and dropped) up to a limit. Decompressing to the end checks the stream's
end, CRC and length, which a lazy read of just the bytes wanted would not.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

GZIP_MAGIC = b"\x1f\x8b"
# Compressed bytes given to zlib at a time: small, as zlib copies what is left of them at the
# end of each gzip member (a file of 10^5 empty members must not cost 10^5 large copies).
_FEED = 4096
_CHUNK = 1 << 20  # decompressed bytes at a time of a stream's unkept remainder


class GzipError(ValueError):
    """The stream is corrupt, or larger than allowed; the message is one line."""


def gunzip_bounded(
    raw: bytes,
    head_size: int,
    claimed: Callable[[bytes], int | None],
    max_bytes: int,
    max_trailing: int,
) -> bytes:
    """The decompressed file, as far as ``claimed(head)`` says it goes.

    ``claimed`` reads the first ``head_size`` decompressed bytes and gives how many bytes the
    file claims (None when it cannot tell: the head alone is returned, once the stream has been
    checked). At most ``max_bytes`` are claimed, and at most ``max_trailing`` more may follow
    them in the stream (decompressed, checked and dropped).

    Raises
    ------
    GzipError
        The stream is truncated or corrupt, claims too much, or goes on too long.
    """
    stream = GzipReader(raw)
    head = stream.read(head_size)
    need = claimed(head)
    if need is None:
        stream.skip(max_trailing)
        return head
    if need > max_bytes:
        raise GzipError(
            f"image too large: its header claims {need} bytes, "
            f"over the {max_bytes >> 30} GiB limit"
        )
    content = head + stream.read(need - len(head))
    if not stream.skip(max_trailing):
        raise GzipError(
            f"gzip stream goes on for over {max_trailing >> 20} MiB "
            f"past the image its header describes (a gzip bomb or a wrong header)"
        )
    return content


class GzipReader:
    """Incremental decompression of an in-memory gzip file, member after member."""

    def __init__(self, raw: bytes) -> None:
        self._raw = memoryview(raw)
        self._fed = 0  # bytes of raw given to zlib so far
        self._member = zlib.decompressobj(wbits=31)  # gzip framing: zlib checks CRC and length
        self.done = False

    def read(self, size: int) -> bytes:
        """Up to ``size`` more decompressed bytes; fewer only at the end of the stream."""
        parts: list[bytes] = []
        got = 0
        while got < size and not self.done:
            if self._member.eof:
                self._next_member()
                continue
            data = self._member.unconsumed_tail
            if not data:  # zlib has taken all it was given: the next piece of the file
                data = self._raw[self._fed : self._fed + _FEED]
                self._fed += len(data)
            if not data:
                raise GzipError("truncated or corrupt gzip stream (ends early)")
            try:
                part = self._member.decompress(data, size - got)
            except zlib.error as exc:
                raise GzipError(f"truncated or corrupt gzip stream ({exc})") from exc
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def skip(self, limit: int) -> bool:
        """Decompress and drop up to about ``limit`` bytes; whether the stream ended there."""
        dropped = 0
        while not self.done and dropped <= limit:
            dropped += len(self.read(_CHUNK))
        return self.done

    def _next_member(self) -> None:
        # As gzip.decompress: members may follow one another, and zero bytes may pad the end.
        self._fed -= len(self._member.unused_data)  # back to the end of this member
        while self._fed < len(self._raw):
            window = bytes(self._raw[self._fed : self._fed + _FEED])
            self._fed += len(window) - len(window.lstrip(b"\0"))
            if window.lstrip(b"\0"):
                break
        if self._fed == len(self._raw):
            self.done = True
        elif bytes(self._raw[self._fed : self._fed + 2]) != GZIP_MAGIC:
            raise GzipError("truncated or corrupt gzip stream (data after its end)")
        else:
            self._member = zlib.decompressobj(wbits=31)
