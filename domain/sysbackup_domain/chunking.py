"""Content-defined chunking (FastCDC, via pyfastcdc's compiled Cython extension).

Cut points depend on content, not offsets, so an insertion near the start of a file or a changed row in
a database dump only changes the chunks around the edit. Parameters were chosen by measurement:
run `bench/chunking.py`.
"""

import errno
import functools
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pyfastcdc import FastCDC


@dataclass(frozen=True)
class ChunkParams:
    """FastCDC limits, plus an optional size up to which the data is kept as one blob uncut."""

    min_size: int
    avg_size: int
    max_size: int
    # Data of at most this many bytes is one blob (0: always let FastCDC decide).
    one_blob_up_to: int = 0
    # FastCDC's normalized chunking level (0-3): higher narrows the chunk size distribution.
    normalization: int = 1

    def __post_init__(self) -> None:
        # pyfastcdc's own bounds, checked here so a bad constant fails at import with a clear message.
        if not 64 <= self.min_size <= self.avg_size <= self.max_size:
            raise ValueError(f"need 64 <= min_size <= avg_size <= max_size, got {self}")
        if self.min_size > 1024 * 1024 or not 256 <= self.avg_size <= 4 * 1024 * 1024:
            raise ValueError(f"min_size must be <= 1 MiB and avg_size in 256 B..4 MiB, got {self}")
        if not 1024 <= self.max_size <= 16 * 1024 * 1024:
            raise ValueError(f"max_size must be in 1 KiB..16 MiB, got {self}")
        if not 0 <= self.one_blob_up_to <= self.max_size:
            raise ValueError(f"one_blob_up_to must be in 0..max_size, got {self}")
        if self.normalization not in (0, 1, 2, 3):
            raise ValueError(f"normalization must be 0..3, got {self.normalization}")


KiB = 1024
MiB = 1024 * KiB

# Files up to 1 MiB are one blob: an edit re-sends at most 1 MiB, and one blob is one index item.
SMALL_FILE_BYTES = 1 * MiB

# Regular files: large chunks keep the number of blobs (index items, trailer entries, dedup checks)
# low; files change in place rarely, and whole-file rewrites gain nothing from small chunks.
FILE_CHUNKING = ChunkParams(
    min_size=256 * KiB, avg_size=1 * MiB, max_size=4 * MiB, one_blob_up_to=SMALL_FILE_BYTES, normalization=1
)

# Snapshot streams (database dumps): small chunks so that scattered changed rows re-send little.
# A changed row re-sends about one chunk (size-biased: long chunks are hit more often), so what matters
# is a small mean with a narrow spread. Measured (bench/chunking.py) on a dump with 1 row in 5,000
# changed: mean chunk ~64 KiB (pyfastcdc's mean is about avg + min), re-sends ~8-9% with 200-byte rows
# and ~5% with 400-byte rows, but ~15% with 100-byte rows (a change every ~420 KiB is too dense for
# 64 KiB chunks; 24 KiB would do, at 2.3x the blobs). Normalization 3 narrows the spread: ~2.5 points
# better than the default 1 at the same mean. 64 KiB is ~17,000 blobs (index items, trailer entries,
# dedup checks) per GiB of dump.
STREAM_CHUNKING = ChunkParams(min_size=8 * KiB, avg_size=56 * KiB, max_size=256 * KiB, normalization=3)


def _chunker(params: ChunkParams) -> FastCDC:
    # A new FastCDC per call: cheap (a 256-entry table), and pyfastcdc objects are not thread-safe.
    return FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=params.normalization,
    )


def chunk_bytes(data: bytes | bytearray | memoryview, params: ChunkParams) -> list[bytes]:
    """Cut `data` into chunks; the same cut points `chunk_file` finds for the same bytes."""
    if len(data) == 0:
        return []
    if len(data) <= params.one_blob_up_to:
        return [bytes(data)]
    return [bytes(chunk.data) for chunk in _chunker(params).cut_buf(data)]


def chunk_file(fileobj: BinaryIO, params: ChunkParams = FILE_CHUNKING) -> Iterator[bytes]:
    """Yield the chunks of a file or pipe, reading it once, in windows of 2 x max_size at most.

    Memory stays bounded (about 2 x max_size plus the chunk being handled) whatever the stream's size.
    An empty stream yields nothing.
    """
    head = b""
    if params.one_blob_up_to:
        head = _read_exactly_or_eof(fileobj, params.one_blob_up_to + 1)
        if len(head) <= params.one_blob_up_to:
            if head:
                yield head
            return
    reader = _PrefixedReader(head, fileobj)
    for chunk in _chunker(params).cut_stream(reader):
        # chunk.data is a view into pyfastcdc's window, valid only until the next chunk: copy it.
        yield bytes(chunk.data)


def _read_exactly_or_eof(fileobj: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, or fewer only at end of file (pipes return short reads)."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        part = fileobj.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


class _PrefixedReader(io.RawIOBase):
    """A reader that first replays `prefix` (already read to decide small-vs-large), then the file."""

    def __init__(self, prefix: bytes, rest: BinaryIO) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._rest = rest
        self._rest_readinto = getattr(rest, "readinto", None)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            count = min(len(buffer), len(self._prefix))
            buffer[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            return count
        if self._rest_readinto is not None:
            return self._rest_readinto(buffer) or 0
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def chunk_sparse_file(fd: int, size: int, params: ChunkParams = FILE_CHUNKING) -> Iterator[bytes] | None:
    """The chunks of a file with holes of at least `max_size` bytes, read around them; None if it has none.

    A hole is never read: it yields zero chunks of `max_size` (the same bytes object each time, so a
    caller may remember its hash) and one shorter remainder. Data between holes is chunked by FastCDC on
    its own, so cut points differ from `chunk_file`'s over the same bytes (dedup between a sparse and a
    dense copy of one file suffers; nothing else does). Holes shorter than `max_size` are read as data.
    """
    extents = _data_extents(fd, size, min_hole=params.max_size)
    if extents is None:
        return None
    return _chunk_extents(fd, size, extents, params)


def _chunk_extents(
    fd: int, size: int, extents: list[tuple[int, int]], params: ChunkParams
) -> Iterator[bytes]:
    position = 0
    for start, end in [*extents, (size, size)]:
        yield from _zero_chunks(start - position, params.max_size)
        if end > start:
            reader = io.BufferedReader(_RangeReader(fd, start, end), buffer_size=params.max_size)
            for chunk in _chunker(params).cut_stream(reader):
                yield bytes(chunk.data)
        position = end


def _zero_chunks(length: int, chunk_size: int) -> Iterator[bytes]:
    whole, rest = divmod(length, chunk_size)
    for _ in range(whole):
        yield _zeros(chunk_size)
    if rest:
        yield bytes(rest)


@functools.lru_cache(maxsize=1)
def _zeros(length: int) -> bytes:
    return bytes(length)


def _data_extents(fd: int, size: int, min_hole: int) -> list[tuple[int, int]] | None:
    """[start, end) of the data between holes of at least `min_hole` bytes; None if there is no such hole
    (or the file system cannot say: SEEK_HOLE then answers the file's end)."""
    try:
        raw = _raw_data_extents(fd, size)
    except OSError:
        return None
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    merged: list[tuple[int, int]] = []
    for start, end in raw:
        previous_end = merged[-1][1] if merged else 0
        if start - previous_end < min_hole:  # a short hole is read as data
            start = merged.pop()[0] if merged else 0
        merged.append((start, end))
    if merged and size - merged[-1][1] < min_hole:
        merged[-1] = (merged[-1][0], size)
    if merged == [(0, size)] or (not merged and size < min_hole):
        return None
    return merged


def _raw_data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    position = 0
    while position < size:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # nothing but hole from here to the end
                break
            raise
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        extents.append((data, hole))
        position = hole
    return extents


class _RangeReader(io.RawIOBase):
    """Bytes [start, end) of a file descriptor, by pread (the descriptor's offset is left alone)."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        super().__init__()
        self._fd, self._position, self._end = fd, start, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._end - self._position)
        if count <= 0:
            return 0
        data = os.pread(self._fd, count, self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)
