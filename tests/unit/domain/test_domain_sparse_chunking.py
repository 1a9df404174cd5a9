"""Files with holes are chunked around them: a hole is never read, and the chunks still spell the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sysbackup_domain.chunking import FILE_CHUNKING, chunk_sparse_file

MiB = 1024 * 1024
MAX = FILE_CHUNKING.max_size


def sparse_file(path: Path, layout: list[tuple[str, int]]) -> bytes:
    """Write `layout` ([("data"|"hole", bytes)]) and return the file's bytes as a reader would see them."""
    expected = bytearray()
    with path.open("wb") as out:
        for kind, length in layout:
            if kind == "data":
                block = os.urandom(length)
                out.write(block)
                expected += block
            else:
                out.seek(length, os.SEEK_CUR)
                expected += bytes(length)
        out.truncate(len(expected))
    return bytes(expected)


def chunks_of(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if os.lseek(fd, 0, os.SEEK_HOLE) >= size and size:
            pytest.skip("this file system keeps no holes")
        chunks = chunk_sparse_file(fd, size)
        return None if chunks is None else list(chunks)
    finally:
        os.close(fd)


def test_chunks_spell_the_file_and_holes_come_as_one_shared_zero_block(tmp_path: Path) -> None:
    path = tmp_path / "image"
    layout = [("data", MiB + 5), ("hole", 3 * MAX + 8192), ("data", 2 * MiB), ("hole", MAX + 8192)]
    expected = sparse_file(path, layout)
    chunks = chunks_of(path)
    assert chunks is not None and b"".join(chunks) == expected
    full_zero_chunks = [chunk for chunk in chunks if len(chunk) == MAX and not any(chunk)]
    assert len(full_zero_chunks) >= 4
    assert all(chunk is full_zero_chunks[0] for chunk in full_zero_chunks)  # one object: hashed once


def test_a_file_that_is_all_hole_is_zero_chunks(tmp_path: Path) -> None:
    path = tmp_path / "empty-disk"
    expected = sparse_file(path, [("hole", 5 * MAX + 3)])
    chunks = chunks_of(path)
    assert chunks is not None and b"".join(chunks) == expected
    assert [len(chunk) for chunk in chunks] == [MAX] * 5 + [3]


def test_files_without_long_holes_take_the_ordinary_path(tmp_path: Path) -> None:
    dense = tmp_path / "dense"
    sparse_file(dense, [("data", 3 * MiB)])
    short_holes = tmp_path / "short-holes"
    sparse_file(short_holes, [("data", MiB), ("hole", MAX - 8192), ("data", MiB)])
    for path in (dense, short_holes):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert chunk_sparse_file(fd, os.fstat(fd).st_size) is None
            assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # the descriptor is left at the start
        finally:
            os.close(fd)
