"""Run the executables in `snapshots.d` and stream their output into blobs (seed: "Snapshotting").

Each is run as `script FD`; what it writes to FD is the snapshot, cut with STREAM_CHUNKING so that a
dump with a few changed rows re-sends only the chunks around them. Its stdout is the description;
a stdout line `::restore-through::CMD` names the command that restores the stream from stdin.

Nothing of the stream touches the disk: chunks go straight to the blob sink, whose backpressure
bounds memory. A snapshotter that exits non-zero, is killed or runs past the timeout is recorded with
its `exit_status` and an `error`; restore refuses such a stream unless asked for the partial bytes.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sysbackup_domain.chunking import STREAM_CHUNKING, chunk_file
from sysbackup_domain.manifest import SnapshotRecord, encode_stream_index

from .pickers import IGNORED_PREFIXES, IGNORED_SUFFIXES, runnable_scripts

SNAPSHOT_FD = 3  # the descriptor number the snapshotter gets as its argument
RESTORE_THROUGH_PREFIX = "::restore-through::"
MAX_DESCRIPTION_CHARS = 60_000  # the manifest caps descriptions at 64 Ki chars
STDOUT_KEEP_BYTES = 256 * 1024  # the description's source; more is read and dropped
STDERR_KEEP_BYTES = 4096  # the tail, for the error message
ERROR_STDERR_CHARS = 1000
KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL, so a snapshotter can clean up (temp files, locks)
READER_JOIN_S = 5.0  # a background process may keep stdout open after the snapshotter exits

AddBlob = Callable[[str, bytes], str]  # (kind, plaintext) -> hash
OnStream = Callable[[str, list[str]], None]  # (stream index hash, the chunks it lists)


def take_snapshots(
    directory: Path,
    timeout_s: float,
    add_blob: AddBlob,
    on_bytes: Callable[[int], None] | None = None,
    on_stream: OnStream | None = None,
) -> tuple[list[SnapshotRecord], list[str]]:
    """Run every snapshotter; returns their records and warnings (a failed one is a warning).

    `on_stream` gets each stream's index hash and chunk list (the commit compares them with the
    parent's)."""
    records: list[SnapshotRecord] = []
    scripts = list(runnable_scripts(directory))
    warnings = [
        f"{path} is not executable, so no snapshot was taken (chmod +x it, or remove it)"
        for path in _not_executable(directory, scripts)
    ]
    for script in scripts:
        record = take_snapshot(script, timeout_s, add_blob, on_bytes, on_stream)
        if record.error:
            warnings.append(f"snapshot {record.name}: {record.error}")
        records.append(record)
    return records, warnings


def _not_executable(directory: Path, scripts: list[Path]) -> list[Path]:
    """Files that look like snapshotters but lack the execute bit: a forgotten chmod loses a dump silently."""
    if not directory.is_dir():
        return []
    return sorted(
        path
        for path in directory.iterdir()
        if path not in scripts
        and path.is_file()
        and not path.name.startswith(IGNORED_PREFIXES)
        and not path.name.endswith(IGNORED_SUFFIXES)
    )


def take_snapshot(
    script: Path,
    timeout_s: float,
    add_blob: AddBlob,
    on_bytes: Callable[[int], None] | None = None,
    on_stream: OnStream | None = None,
) -> SnapshotRecord:
    """Run one snapshotter, chunking its stream into `add_blob` as it comes; never raises for its failure.

    `timeout_s` is the snapshotter's own time: time spent waiting on `add_blob` (uploads on a slow
    link) does not count against it.

    (A failure of `add_blob` itself, e.g. the backend is unreachable, does propagate: the child is
    killed and reaped first.)
    """
    deadline = time.monotonic() + timeout_s
    try:
        child = _spawn(script)
    except OSError as error:
        return SnapshotRecord(script.name, "", None, 0, None, None, f"cannot run: {error}")
    stdout = _Capture(child.stdout, STDOUT_KEEP_BYTES, keep_tail=False)
    stderr = _Capture(child.stderr, STDERR_KEEP_BYTES, keep_tail=True)
    stream = _DeadlineReader(child.stream, deadline)
    try:
        chunks, size = _chunk_stream(stream, add_blob, on_bytes)
        timed_out = stream.timed_out
        status = None if timed_out else _wait_until(child.pid, stream.deadline)
        if status is None:
            timed_out = True
            status = _terminate(child.pid)
    except BaseException:
        stream.close()  # its writes now fail (EPIPE) instead of blocking while we wait for it
        _terminate(child.pid)
        raise
    finally:
        stream.close()
        stdout.join(READER_JOIN_S)
        stderr.join(READER_JOIN_S)
    description, restore_through = parse_description(stdout.data)
    error = _failure(status, timed_out, timeout_s, stderr.data)
    if restore_through is not None and len(restore_through) > MAX_DESCRIPTION_CHARS:
        # Never store a cut-off command: run at restore time, it would do something else.
        restore_through = None
        error = error or f"its restore-through command is longer than {MAX_DESCRIPTION_CHARS} characters"
    index = add_blob("data", encode_stream_index(chunks))
    if on_stream is not None:
        on_stream(index, chunks)
    return SnapshotRecord(script.name, description, restore_through, size, index, status, error)


def _chunk_stream(
    stream: _DeadlineReader, add_blob: AddBlob, on_bytes: Callable[[int], None] | None
) -> tuple[list[str], int]:
    """Cut the stream into blobs as it arrives; returns their hashes in order and the byte count."""
    chunks: list[str] = []
    size = 0
    for chunk in chunk_file(stream, STREAM_CHUNKING):  # type: ignore[arg-type]
        handed_over = time.monotonic()
        chunks.append(add_blob("data", chunk))
        # Time the sink held us (uploads, backpressure) is ours, not the snapshotter's.
        stream.postpone(time.monotonic() - handed_over)
        size += len(chunk)
        if on_bytes:
            on_bytes(len(chunk))
    return chunks, size


def _failure(status: int, timed_out: bool, timeout_s: float, stderr: bytes) -> str | None:
    """The error to record, or None for a clean exit 0. Ends with the last lines of stderr."""
    if timed_out:
        problem = f"still running at the {timeout_s:g} s timeout, so stopped ({describe_exit_status(status)})"
    elif status != 0:
        problem = describe_exit_status(status)
    else:
        return None
    said = stderr.decode(errors="replace").strip()[-ERROR_STDERR_CHARS:]
    problem += "; the stream is incomplete"
    return f"{problem}: {said}" if said else problem


def describe_exit_status(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by {name}"
    return f"exited with status {status}"


def _wait_until(pid: int, deadline: float) -> int | None:
    """The child's exit code (negative: killed by that signal), or None if it still runs at `deadline`."""
    pause = 0.005
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(wait_status)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.2)


def _terminate(pid: int) -> int:
    """SIGTERM the snapshotter's whole process group, SIGKILL it after a grace period; reap; exit code."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)  # the child leads its own session (setsid), so pgid == pid
    status = _wait_until(pid, time.monotonic() + KILL_GRACE_S)
    if status is not None:
        return status
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


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


class _DeadlineReader(io.RawIOBase):
    """The read end of the snapshot pipe, ending (as at EOF) when the deadline passes.

    A snapshotter that hangs with the pipe open, or a background process it left holding the pipe,
    cannot stall the run past the timeout; `timed_out` tells such an end from a real EOF.
    """

    def __init__(self, fd: int, deadline: float) -> None:
        super().__init__()
        self._file = io.FileIO(fd, "rb", closefd=True)
        self.deadline = deadline
        self.timed_out = False

    def postpone(self, seconds: float) -> None:
        self.deadline += seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.timed_out:
            return 0
        poller = select.poll()
        poller.register(self._file.fileno(), select.POLLIN)
        while True:
            remaining_ms = int((self.deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                self.timed_out = True
                return 0
            if poller.poll(min(remaining_ms, 1000)):  # POLLIN, or POLLHUP at EOF: read tells which
                return self._file.readinto(buffer) or 0

    def close(self) -> None:
        self._file.close()
        super().close()


class _Capture:
    """Drains a pipe on a thread (a chatty child never blocks on a full pipe), keeping a bounded part."""

    def __init__(self, fd: int, keep_bytes: int, *, keep_tail: bool) -> None:
        self._fd = fd
        self._keep = keep_bytes
        self._keep_tail = keep_tail
        self._data = bytearray()
        self._lock = threading.Lock()  # `data` may be read while a leftover process still writes
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        with open(self._fd, "rb", buffering=0) as pipe:
            while block := pipe.read(65536):
                with self._lock:
                    self._keep_block(block)

    def _keep_block(self, block: bytes) -> None:
        if self._keep_tail:
            self._data += block
            del self._data[: max(0, len(self._data) - self._keep)]
        elif len(self._data) < self._keep:
            self._data += block[: self._keep - len(self._data)]

    def join(self, timeout_s: float) -> None:
        # If a background process still holds the pipe, go on with what was read; the daemon
        # thread ends when that process closes it.
        self._thread.join(timeout_s)

    @property
    def data(self) -> bytes:
        with self._lock:
            return bytes(self._data)


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
