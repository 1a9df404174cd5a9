"""A snapshot stream through the real archive: what a changed dump uploads again, and the memory it takes.

The dump is generated: 200,000 rows of COPY-style text (~300 bytes a row, ~60 MB). The figures come
from `archive --stats-json` (`bytes_uploaded` counts pack bytes, i.e. compressed, as sent).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from sysbackup_local.stack import LocalHost
from test_archive_restore import cli

ROWS = 200_000
WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
    "whiskey", "xray", "yankee", "zulu", "amber", "basalt", "cobalt", "dune", "ember", "fjord", "granite",
    "harbor", "island", "jasper", "kelp", "lagoon", "meadow", "nickel", "orchard", "prairie", "quartz",
]  # fmt: skip
MAX_ARCHIVE_RSS_BYTES = 256 * 2**20  # measured ~85 MiB; half the stream would be 256 MiB
PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "sys.exit(code)\n"
)


def make_row(rng: random.Random, row_id: int) -> bytes:
    name = " ".join(rng.choices(WORDS, k=2)).title()
    notes = " ".join(rng.choices(WORDS, k=rng.randint(20, 50)))
    balance = rng.randint(0, 10**7) / 100
    opened = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    email = f"{name.replace(' ', '.').lower()}{row_id}@example.com"
    return f"{row_id}\t{name}\t{email}\t{balance:.2f}\t{opened}\t{notes}\n".encode()


def generated_rows(seed: int = 5) -> list[bytes]:
    rng = random.Random(seed)
    return [make_row(rng, row_id) for row_id in range(1, ROWS + 1)]


def write_dump(path: Path, rows: list[bytes]) -> int:
    header = b"COPY public.accounts (id, name, email, balance, opened, notes) FROM stdin;\n"
    data = header + b"".join(rows) + b"\\.\n"
    path.write_bytes(data)
    return len(data)


def archive_stats(host: LocalHost, stats_file: Path) -> dict:
    done = cli(host.config_dir, "archive", "-q", "--stats-json", str(stats_file))
    assert done.returncode == 0, done.stderr
    return json.loads(stats_file.read_text())


@pytest.fixture
def dump_host(host_config: LocalHost, tmp_path: Path) -> tuple[LocalHost, Path]:
    """A host whose only snapshotter streams `dump.sql` (as a database dump would)."""
    dump = tmp_path / "dump.sql"
    snapshotter = host_config.config_dir / "snapshots.d" / "accounts"
    snapshotter.write_text(
        "#!/bin/bash\necho 'accounts table'\necho '::restore-through::cat > /dev/null'\n"
        f"cat {dump} >&${{1:-1}}\n"
    )
    snapshotter.chmod(0o755)
    conf = host_config.config_dir / "conf"
    conf.write_text(conf.read_text().replace("[content]\n", f"[content]\ncache_dir = {tmp_path / 'cache'}\n"))
    return host_config, dump


@pytest.mark.slow
def test_a_dump_with_few_changed_rows_uploads_little_and_an_unchanged_one_nothing(dump_host, tmp_path: Path):
    host, dump = dump_host
    rows = generated_rows()
    size = write_dump(dump, rows)
    first = archive_stats(host, tmp_path / "first.json")
    assert first["snapshot_bytes"] == size and first["bytes_uploaded"] > size // 4

    unchanged = archive_stats(host, tmp_path / "unchanged.json")
    assert unchanged["bytes_uploaded"] == 0 and unchanged["packs"] == 0, unchanged

    # 1 row in 5,000 changed, spread through the table (and of a different length: later bytes shift).
    rng = random.Random(77)
    for index in range(rng.randrange(5000), ROWS, 5000):
        rows[index] = make_row(rng, index + 1)
    size = write_dump(dump, rows)
    scattered = archive_stats(host, tmp_path / "scattered.json")
    assert scattered["bytes_uploaded"] < 0.10 * first["bytes_uploaded"], (scattered, first)
    assert scattered["bytes_uploaded"] < 0.10 * size

    # 1% of the rows changed, all in one key range.
    start = rng.randrange(ROWS - ROWS // 100)
    for index in range(start, start + ROWS // 100):
        rows[index] = make_row(rng, index + 1)
    size = write_dump(dump, rows)
    ranged = archive_stats(host, tmp_path / "ranged.json")
    assert ranged["bytes_uploaded"] < 0.10 * first["bytes_uploaded"], (ranged, first)
    assert ranged["bytes_uploaded"] < 0.10 * size
    for label, stats in (("scattered", scattered), ("one range", ranged)):
        share = stats["bytes_uploaded"] / first["bytes_uploaded"]
        print(f"{label}: {stats['bytes_uploaded']} bytes uploaded again, {share:.1%} of the first upload")

    restored = tmp_path / "restored.sql"
    written = cli(host.config_dir, "restore", "latest", "--snapshot", "accounts", "--output", str(restored))
    assert written.returncode == 0, written.stderr
    assert restored.read_bytes() == dump.read_bytes()  # the deduplicated stream is still the whole dump


@pytest.mark.slow
def test_a_large_stream_takes_bounded_memory_and_no_temporary_file(dump_host, tmp_path: Path):
    """512 MiB streamed straight from a pipe: the archive's peak RSS stays far below the stream's size.

    The stream repeats one random 4 MiB block with a counter between copies, so chunking, hashing and
    the dedup path see every byte while little has to be uploaded.
    """
    host, _ = dump_host
    block = tmp_path / "block.bin"
    block.write_bytes(os.urandom(4 * 2**20))
    (host.config_dir / "snapshots.d" / "accounts").write_text(
        f'#!/bin/bash\nfor i in $(seq 128); do echo "copy $i"; cat {block}; done >&$1\n'
    )
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    # A wrapper reports the peak RSS of its one child, the archive (RUSAGE_CHILDREN: largest of them).
    measured = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_WRAPPER, sys.executable, "-m", "s3_sysbackup.cli",
         "--config-dir", str(host.config_dir), "archive", "-q", "--stats-json", str(tmp_path / "big.json")],
        env={**os.environ, "TMPDIR": str(scratch)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert measured.returncode == 0, measured.stderr
    stats = json.loads((tmp_path / "big.json").read_text())
    assert stats["snapshot_bytes"] > 512 * 2**20
    peak = int(measured.stdout.split()[-1])
    print(
        f"archive of a {stats['snapshot_bytes'] / 2**20:.0f} MiB stream peaked at {peak / 2**20:.0f} MiB RSS"
    )
    assert peak < MAX_ARCHIVE_RSS_BYTES, f"archive peaked at {peak / 2**20:.0f} MiB"
    assert list(scratch.iterdir()) == []
