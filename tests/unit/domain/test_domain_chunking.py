"""Content-defined chunking: same cuts from bytes and streams, shift resistance, bounded memory."""

import io
import os
import random
import tracemalloc

import pytest
from sysbackup_domain.chunking import (
    FILE_CHUNKING,
    SMALL_FILE_BYTES,
    STREAM_CHUNKING,
    ChunkParams,
    chunk_bytes,
    chunk_file,
)

MiB = 1024 * 1024


class TrickleReader:
    """A pipe-like reader: only read(), and short reads of at most `step` bytes."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def read(self, size: int = -1) -> bytes:
        count = min(self._step, len(self._data)) if size < 0 else min(size, self._step, len(self._data))
        part, self._data = bytes(self._data[:count]), self._data[count:]
        return part


class GeneratedStream(io.RawIOBase):
    """`total` bytes of varied content made on the fly (never held in memory), via readinto."""

    def __init__(self, total: int, seed: int = 7) -> None:
        super().__init__()
        self._remaining = total
        block = random.Random(seed).randbytes(MiB + 4093)  # odd length: the pattern does not repeat per MiB
        self._block = memoryview(block)
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._remaining, len(self._block) - self._position)
        buffer[:count] = self._block[self._position : self._position + count]
        self._position = (self._position + count) % len(self._block)
        self._remaining -= count
        return count


def random_data(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("params", [FILE_CHUNKING, STREAM_CHUNKING], ids=["file", "stream"])
def test_stream_and_buffer_chunking_agree_and_cover_the_input(params: ChunkParams) -> None:
    data = random_data(9 * MiB)
    from_bytes = chunk_bytes(data, params)
    from_file = list(chunk_file(io.BytesIO(data), params))
    from_pipe = list(chunk_file(TrickleReader(data, 7000), params))  # type: ignore[arg-type]

    assert from_bytes == from_file == from_pipe
    assert b"".join(from_bytes) == data
    assert len(from_bytes) > 1
    assert all(params.min_size <= len(chunk) <= params.max_size for chunk in from_bytes[:-1])
    assert len(from_bytes[-1]) <= params.max_size


@pytest.mark.parametrize("size", [1, 1000, SMALL_FILE_BYTES])
def test_small_files_are_one_blob(size: int) -> None:
    data = random_data(size)
    assert chunk_bytes(data, FILE_CHUNKING) == [data]
    assert list(chunk_file(TrickleReader(data, 4096))) == [data]  # type: ignore[arg-type]


def test_a_file_just_over_the_small_limit_goes_through_fastcdc() -> None:
    data = random_data(4 * SMALL_FILE_BYTES + 1)
    chunks = list(chunk_file(io.BytesIO(data)))
    assert b"".join(chunks) == data
    assert chunks == chunk_bytes(data, FILE_CHUNKING)
    assert len(chunks) >= 2


def test_empty_input_has_no_chunks() -> None:
    assert chunk_bytes(b"", FILE_CHUNKING) == []
    assert list(chunk_file(io.BytesIO(b""))) == []
    assert list(chunk_file(io.BytesIO(b""), STREAM_CHUNKING)) == []


def test_insertion_near_the_start_leaves_most_chunks_unchanged() -> None:
    data = random_data(4 * MiB, seed=3)
    edited = data[:1000] + b"a few inserted bytes" + data[1000:]
    before = chunk_bytes(data, STREAM_CHUNKING)
    after = chunk_bytes(edited, STREAM_CHUNKING)

    shared = set(before) & set(after)
    # Only the chunk holding the edit (and perhaps its neighbour) may differ.
    assert len(before) >= 30
    assert len(shared) >= len(before) - 2
    # Fixed-size blocks would share nothing after the shift: check the test can tell the difference.
    fixed = {data[i : i + 65536] for i in range(0, len(data), 65536)}
    fixed_after = {edited[i : i + 65536] for i in range(0, len(edited), 65536)}
    assert len(fixed & fixed_after) <= 1


def test_chunk_params_are_checked() -> None:
    with pytest.raises(ValueError, match="min_size"):
        ChunkParams(min_size=1024, avg_size=512, max_size=4096)
    with pytest.raises(ValueError, match="max_size"):
        ChunkParams(min_size=1024, avg_size=2048, max_size=32 * MiB)
    with pytest.raises(ValueError, match="one_blob_up_to"):
        ChunkParams(min_size=1024, avg_size=2048, max_size=4096, one_blob_up_to=8192)


def test_stream_chunking_average_is_in_the_designed_range() -> None:
    data = os.urandom(16 * MiB)
    chunks = chunk_bytes(data, STREAM_CHUNKING)
    average = len(data) / len(chunks)
    assert 48 * 1024 <= average <= 128 * 1024


@pytest.mark.timeout(120)
def test_chunk_file_memory_stays_bounded_on_a_large_stream() -> None:
    total = 512 * MiB
    tracemalloc.start()
    try:
        seen = 0
        largest = 0
        for chunk in chunk_file(GeneratedStream(total)):
            seen += len(chunk)
            largest = max(largest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == total
    assert largest <= FILE_CHUNKING.max_size
    # The window is 2 x max_size (8 MiB) plus the chunk in hand: nowhere near the stream's size.
    assert peak < 3 * FILE_CHUNKING.max_size + 4 * MiB, f"peak {peak / MiB:.1f} MiB"


def synthetic_dump(rows: int, row_bytes: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    words = [b"alpha", b"bravo", b"charlie", b"delta", b"echo", b"foxtrot", b"golf", b"hotel", b"india"]
    dump = []
    for row_id in range(rows):
        text = b" ".join(rng.choice(words) for _ in range(row_bytes // 7))
        dump.append(b"%d\tuser%d@example.org\t%s\n" % (row_id, rng.randrange(10**6), text))
    return dump


def test_dump_with_one_row_in_5000_changed_resends_under_ten_percent() -> None:
    rows = synthetic_dump(60_000, 300, seed=5)
    before = b"".join(rows)
    for index in range(1234, len(rows), 5000):
        rows[index] = b"%d\tchanged@example.org\tedited row\n" % index
    after = b"".join(rows)

    known = set(chunk_bytes(before, STREAM_CHUNKING))
    resent = sum(len(chunk) for chunk in chunk_bytes(after, STREAM_CHUNKING) if chunk not in known)
    assert resent > 0  # the edits are seen
    assert resent / len(after) < 0.10


def test_pyfastcdc_runs_its_compiled_extension() -> None:
    # The pure-Python fallback is ~1000x slower: a deployment that silently used it would crawl.
    import pyfastcdc

    assert pyfastcdc.FastCDC.__module__.startswith("pyfastcdc.cy")
