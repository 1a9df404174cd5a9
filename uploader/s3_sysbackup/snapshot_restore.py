"""`restore --snapshot NAME`: a snapshot's stream into its restore-through command, a file or stdout.

The stream is written as it is fetched (a window of chunks at a time, every chunk verified), so a
dump of any size restores in bounded memory. What must never happen is a consumer taking a cut-off
stream for a whole one: if fetching fails half way, the restore-through command is killed before
its stdin is closed (an `a && b` command never runs `b` on half a dump), and a file is written
under a temporary name and renamed only once complete.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .fetch import BlobFetcher
from .restorer import RestoreError, restorable_snapshot, write_snapshot
from .snapshots import describe_exit_status

SHELL = "/bin/sh"
STDOUT = "-"
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class SnapshotRestore:
    """What was restored, for the one-line report."""

    name: str
    bytes_written: int
    destination: str  # "through CMD", "to FILE" or "to stdout"


def restore_through_command(
    fetcher: BlobFetcher, manifest: dict, name: str, announce: BinaryIO | None = None
) -> SnapshotRestore:
    """Pipe the stream into the snapshot's `::restore-through::` command (run by /bin/sh -c)."""
    snapshot = restorable_snapshot(manifest, name)  # refused before anything runs
    command = snapshot.get("restore_through")
    if not command:
        raise RestoreError(
            f"snapshot {name!r} recorded no restore-through command; "
            "write it out with --output FILE (or --output - for stdout)"
        )
    if announce is not None:
        # The command comes from the manifest (the snapshotter printed it): show what will run.
        announce.write(f"restoring snapshot {name!r} through: {command}\n".encode(errors="replace"))
        announce.flush()
    # Inherits our stdout, stderr and terminal (a password prompt still works); only stdin is ours.
    child = subprocess.Popen([SHELL, "-c", command], stdin=subprocess.PIPE)
    assert child.stdin is not None
    try:
        written = write_snapshot(fetcher, manifest, name, child.stdin)
    except BrokenPipeError:
        status = _close_and_wait(child)
        raise RestoreError(
            f"the restore-through command stopped reading before the end of snapshot {name!r} "
            f"({describe_exit_status(status)}): {command}"
        ) from None
    except BaseException:
        _kill_tree(child.pid)
        _close_and_wait(child)
        raise
    status = _close_and_wait(child)
    if status != 0:
        raise RestoreError(f"the restore-through command {describe_exit_status(status)}: {command}")
    return SnapshotRestore(name, written, f"through {command}")


def write_to_file(
    fetcher: BlobFetcher,
    manifest: dict,
    name: str,
    output: str,
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> SnapshotRestore:
    """The raw stream into `output` (`-`: stdout); a file appears under its name only when complete."""
    restorable_snapshot(manifest, name, allow_incomplete=allow_incomplete)
    if output == STDOUT:
        written = write_snapshot(
            fetcher, manifest, name, sys.stdout.buffer, allow_incomplete=allow_incomplete
        )
        return SnapshotRestore(name, written, "to stdout")
    path = Path(output)
    if path.exists() and not overwrite:
        raise RestoreError(f"{path} already exists (use --overwrite to replace it)")
    with _file_when_complete(path) as out:
        written = write_snapshot(fetcher, manifest, name, out, allow_incomplete=allow_incomplete)
    return SnapshotRestore(name, written, f"to {path}")


@contextlib.contextmanager
def _file_when_complete(path: Path) -> Iterator[BinaryIO]:
    """A temporary file next to `path`, renamed to it on success and removed on failure."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _close_and_wait(child: subprocess.Popen) -> int:
    with contextlib.suppress(BrokenPipeError):
        if child.stdin is not None:
            child.stdin.close()
    return child.wait()


def _kill_tree(pid: int) -> None:
    """SIGKILL the shell and everything it started, before they see EOF on a stream cut short.

    The command shares our process group and session (so it can prompt on the terminal); its
    processes are found through their parent links instead.
    """
    for victim in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found
