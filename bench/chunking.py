"""Measure what the domain package's constants rest on: chunking, hashing and compression speed, and
how much of a database dump is re-sent when 1 row in 5,000 changed.

    .venv/bin/python bench/chunking.py [--quick]

Data: this Python's standard library sources (realistic text/code) concatenated as one stream, and a
synthetic SQL dump. Figures depend on the machine (and on other work sharing its CPUs): compare within
one run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import random
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pyfastcdc
import zstandard
from sysbackup_domain.chunking import FILE_CHUNKING, STREAM_CHUNKING, ChunkParams, chunk_bytes, chunk_file
from sysbackup_domain.compression import ZSTD_LEVEL

MiB = 1024 * 1024
KiB = 1024


def stdlib_corpus(limit: int) -> bytes:
    """Up to `limit` bytes of the standard library's .py files, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if total >= limit:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data)
        total += len(data)
    return b"".join(parts)[:limit]


def timed(function: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of `repeat` runs (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:8.0f} MiB/s"


def report_pyfastcdc() -> None:
    implementation = pyfastcdc.FastCDC.__module__
    compiled = implementation.startswith("pyfastcdc.cy")
    print(
        f"pyfastcdc {pyfastcdc.__version__}: {implementation}"
        f" ({'compiled Cython' if compiled else 'PURE PYTHON'})"
    )
    if not compiled:
        print("  WARNING: the pure-Python fallback is far too slow for backups", file=sys.stderr)


def bench_chunking(corpus: bytes) -> None:
    print(f"\n== chunking ({len(corpus) / MiB:.0f} MiB of stdlib sources) ==")
    for label, params in (("FILE", FILE_CHUNKING), ("STREAM", STREAM_CHUNKING)):
        chunks = chunk_bytes(corpus, params)
        buffer_seconds = timed(lambda params=params: chunk_bytes(corpus, params))
        stream_seconds = timed(lambda params=params: sum(1 for _ in chunk_file(io.BytesIO(corpus), params)))
        print(
            f"{label:6} min/avg/max {params.min_size // KiB}/{params.avg_size // KiB}"
            f"/{params.max_size // KiB} KiB: "
            f"{len(chunks)} chunks, mean {len(corpus) / len(chunks) / KiB:.0f} KiB; "
            f"chunk_bytes {rate(len(corpus), buffer_seconds)}, chunk_file {rate(len(corpus), stream_seconds)}"
        )


def bench_hashing(corpus: bytes) -> None:
    print("\n== hashing ==")
    chunks = chunk_bytes(corpus, FILE_CHUNKING)
    seconds = timed(lambda: [hashlib.sha256(chunk).digest() for chunk in chunks])
    print(f"SHA-256 over FILE chunks: {rate(len(corpus), seconds)}")
    combined = timed(lambda: [hashlib.sha256(chunk).digest() for chunk in chunk_file(io.BytesIO(corpus))])
    print(f"chunk_file + SHA-256 in one pass: {rate(len(corpus), combined)}")


def bench_compression(corpus: bytes) -> None:
    print("\n== compression, per blob (FILE chunks, as the packer does) ==")
    chunks = chunk_bytes(corpus, FILE_CHUNKING)
    total = len(corpus)
    candidates: list[tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = []
    for level in (1, 3, 6):
        compressor = zstandard.ZstdCompressor(level=level)
        decompressor = zstandard.ZstdDecompressor()
        candidates.append((f"zstd -{level}", compressor.compress, decompressor.decompress))
    candidates.append(("gzip -6", lambda data: gzip.compress(data, 6, mtime=0), gzip.decompress))
    for label, compress, decompress in candidates:
        compressed = [compress(chunk) for chunk in chunks]
        size = sum(map(len, compressed))
        compress_seconds = timed(lambda compress=compress: [compress(chunk) for chunk in chunks], repeat=2)
        decompress_seconds = timed(
            lambda decompress=decompress, compressed=compressed: [decompress(c) for c in compressed], repeat=2
        )
        print(
            f"{label:8} ratio {size / total:5.3f}  compress {rate(total, compress_seconds)}"
            f"  decompress {rate(total, decompress_seconds)}"
        )
    print(f"(the domain uses zstd level {ZSTD_LEVEL})")


# -- a database dump with 1 row in 5,000 changed --------------------------------------------------------

_WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
]


def dump_rows(count: int, row_bytes: int, seed: int) -> list[bytes]:
    """COPY-style rows of about `row_bytes`: id, names, an e-mail, a timestamp, free text."""
    rng = random.Random(seed)
    rows = []
    for row_id in range(count):
        fixed = (
            f"{row_id}\t{rng.choice(_WORDS)} {rng.choice(_WORDS)}\tuser{rng.randrange(10**6)}@example.org\t"
            f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} {rng.randrange(24):02d}:00:00\t"
        )
        words: list[str] = []
        while len(fixed) + sum(len(w) + 1 for w in words) < row_bytes * rng.uniform(0.6, 1.4):
            words.append(rng.choice(_WORDS))
        rows.append((fixed + " ".join(words) + "\n").encode())
    return rows


def change_spread_rows(rows: list[bytes], every: int, seed: int) -> list[bytes]:
    """Change one row in `every`, spread through the dump (an UPDATE of a text column)."""
    rng = random.Random(seed)
    changed = list(rows)
    for index in range(rng.randrange(every), len(rows), every):
        head, _, _ = changed[index].rpartition(b"\t")
        changed[index] = head + b"\t" + " ".join(rng.choice(_WORDS) for _ in range(8)).encode() + b" edited\n"
    return changed


def resent_fraction(before: bytes, after: bytes, params: ChunkParams) -> tuple[float, int]:
    """Bytes of `after` in chunks the store does not already hold, as a fraction; and the chunk count."""
    known = set(chunk_bytes(before, params))
    chunks = chunk_bytes(after, params)
    new_bytes = sum(len(chunk) for chunk in chunks if chunk not in known)
    return new_bytes / len(after), len(chunks)


def bench_dump(dump_mib: int) -> None:
    print(f"\n== re-upload of a ~{dump_mib} MiB dump with 1 row in 5,000 changed (target < 10%) ==")
    variants = [
        ("STREAM_CHUNKING (chosen)", STREAM_CHUNKING),
        ("16/64/256 KiB, NC 1", ChunkParams(16 * KiB, 64 * KiB, 256 * KiB, normalization=1)),
        ("16/48/192 KiB, NC 2", ChunkParams(16 * KiB, 48 * KiB, 192 * KiB, normalization=2)),
        ("8/24/128 KiB, NC 3", ChunkParams(8 * KiB, 24 * KiB, 128 * KiB, normalization=3)),
        ("32/128/512 KiB, NC 1", ChunkParams(32 * KiB, 128 * KiB, 512 * KiB, normalization=1)),
        ("FILE_CHUNKING (no 1-blob rule)", replace(FILE_CHUNKING, one_blob_up_to=0)),
    ]
    for row_bytes in (100, 200, 400):
        rows = dump_rows(dump_mib * MiB // row_bytes, row_bytes, seed=row_bytes)
        before = b"".join(rows)
        after = b"".join(change_spread_rows(rows, 5000, seed=1))
        gap_kib = 5000 * len(before) / len(rows) / KiB
        print(f"rows of ~{row_bytes} B (a changed row every ~{gap_kib:.0f} KiB):")
        for label, params in variants:
            fraction, count = resent_fraction(before, after, params)
            per_gib = count * 1024 / (len(after) / MiB)
            print(f"  {label:32} re-sends {fraction:6.1%}  ({per_gib:,.0f} chunks per GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a few seconds)")
    arguments = parser.parse_args()
    corpus_bytes = 16 * MiB if arguments.quick else 64 * MiB
    dump_mib = 16 if arguments.quick else 64

    report_pyfastcdc()
    corpus = stdlib_corpus(corpus_bytes)
    bench_chunking(corpus)
    bench_hashing(corpus)
    bench_compression(corpus)
    bench_dump(dump_mib)


if __name__ == "__main__":
    main()
