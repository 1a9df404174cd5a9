"""Run the executables in `snapshots.d` and stream their output into blobs (seed: "Snapshotting").

Each is run as `script FD`; what it writes to FD is the snapshot, cut with STREAM_CHUNKING so that a
dump with a few changed rows re-sends only the chunks around them. Its stdout is the description;
a stdout line `::restore-through::CMD` names the command that restores the stream from stdin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sysbackup_domain.chunking import STREAM_CHUNKING, chunk_file
from sysbackup_domain.manifest import SnapshotRecord, encode_stream_index

from .pickers import runnable_scripts

SNAPSHOT_FD = 3  # the descriptor number the snapshotter gets as its argument
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
    try:
        child = _spawn(script)
    except OSError as error:
        return SnapshotRecord(script.name, "", None, 0, None, None, f"cannot run: {error}")
    timed_out = threading.Event()

    def kill_on_timeout() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill_on_timeout)
    timer.daemon = True
    output: dict[str, bytes] = {}
    # stdout/stderr are drained by threads so a chatty snapshotter never blocks on a full pipe.
    readers = [
        threading.Thread(target=_drain, args=(fd, name, output), daemon=True)
        for name, fd in (("stdout", child.stdout), ("stderr", child.stderr))
    ]
    for reader in readers:
        reader.start()
    timer.start()
    chunks: list[str] = []
    size = 0
    try:
        with open(child.stream, "rb", buffering=0) as stream:
            for chunk in chunk_file(stream, STREAM_CHUNKING):  # type: ignore[arg-type]
                chunks.append(add_blob("data", chunk))
                size += len(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
        _, wait_status = os.waitpid(child.pid, 0)
        status = os.waitstatus_to_exitcode(wait_status)
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


@dataclass(frozen=True)
class _Child:
    pid: int
    stream: int  # read end of the snapshot pipe
    stdout: int
    stderr: int


def _spawn(script: Path) -> _Child:
    """Start `script SNAPSHOT_FD` in its own session, its stream pipe on fd SNAPSHOT_FD.

    A fixed low fd, because `>&$1` in dash and other shells only takes single-digit fds, and ours
    could be any number. posix_spawn's dup2 actions do this without preexec_fn (unsafe with threads).
    """
    stream_r, stream_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = os.posix_spawn(
            str(script),
            [str(script), str(SNAPSHOT_FD)],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
                (os.POSIX_SPAWN_DUP2, stream_w, SNAPSHOT_FD),
            ],
            setsid=True,
        )
    except OSError:
        for fd in (stream_r, out_r, err_r):
            os.close(fd)
        raise
    finally:
        # The child holds its own copies; ours must go, or EOF never comes.
        for fd in (stream_w, out_w, err_w, devnull):
            os.close(fd)
    return _Child(pid, stream_r, out_r, err_r)


def _drain(fd: int, name: str, output: dict[str, bytes]) -> None:
    with open(fd, "rb") as pipe:
        output[name] = pipe.read()


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
