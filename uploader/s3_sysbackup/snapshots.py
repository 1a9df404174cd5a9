"""Run the executables in `snapshots.d` and stream their output into blobs (seed: "Snapshotting").

Each is run as `script FD`; what it writes to FD is the snapshot, cut with STREAM_CHUNKING so that a
dump with a few changed rows re-sends only the chunks around them. Its stdout is the description;
a stdout line `::restore-through::CMD` names the command that restores the stream from stdin.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from sysbackup_domain.chunking import STREAM_CHUNKING, chunk_file
from sysbackup_domain.manifest import SnapshotRecord, encode_stream_index

from .pickers import kill_group, runnable_scripts

RESTORE_THROUGH_PREFIX = "::restore-through::"
MAX_DESCRIPTION_CHARS = 60_000  # the manifest caps descriptions at 64 Ki chars

AddBlob = Callable[[str, bytes], str]  # (kind, plaintext) -> hash


def take_snapshots(
    directory: Path, timeout_s: float, add_blob: AddBlob, on_bytes: Callable[[int], None] | None = None
) -> tuple[list[SnapshotRecord], list[str]]:
    """Run every snapshotter; returns their records and warnings (a failed one is a warning)."""
    records: list[SnapshotRecord] = []
    warnings: list[str] = []
    for script in runnable_scripts(directory):
        record = take_snapshot(script, timeout_s, add_blob, on_bytes)
        if record.error:
            warnings.append(f"snapshot {record.name}: {record.error}")
        records.append(record)
    return records, warnings


def take_snapshot(
    script: Path, timeout_s: float, add_blob: AddBlob, on_bytes: Callable[[int], None] | None = None
) -> SnapshotRecord:
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            [str(script), str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    except OSError as error:
        os.close(read_fd)
        os.close(write_fd)
        return SnapshotRecord(script.name, "", None, 0, None, None, f"cannot run: {error}")
    os.close(write_fd)  # only the child writes; EOF comes when it (and its children) close it
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        kill_group(process)

    timer = threading.Timer(timeout_s, kill_on_timeout)
    timer.daemon = True
    output: dict[str, bytes] = {}
    # stdout/stderr are drained by threads so a chatty snapshotter never blocks on a full pipe.
    readers = [
        threading.Thread(target=lambda n=name, s=stream: output.__setitem__(n, s.read()), daemon=True)
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    timer.start()
    chunks: list[str] = []
    size = 0
    try:
        with open(read_fd, "rb", buffering=0) as stream:
            for chunk in chunk_file(stream, STREAM_CHUNKING):
                chunks.append(add_blob("data", chunk))
                size += len(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
        status = process.wait()
    finally:
        timer.cancel()
        for reader in readers:
            reader.join()
    description, restore_through = parse_description(output.get("stdout", b""))
    error = None
    if timed_out.is_set():
        error = f"killed after {timeout_s:g} s timeout; the stream is incomplete"
    elif status != 0:
        last = output.get("stderr", b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
        error = f"exited with status {status} {last[0]}".rstrip()
    index = add_blob("data", encode_stream_index(chunks))
    return SnapshotRecord(script.name, description, restore_through, size, index, status, error)


def parse_description(stdout: bytes) -> tuple[str, str | None]:
    """Split a snapshotter's stdout into its description and its `::restore-through::` command."""
    lines: list[str] = []
    restore_through = None
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith(RESTORE_THROUGH_PREFIX):
            restore_through = line[len(RESTORE_THROUGH_PREFIX) :].strip() or None
        else:
            lines.append(line)
    return "\n".join(lines).strip()[:MAX_DESCRIPTION_CHARS], restore_through
