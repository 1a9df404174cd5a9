"""Run the executables in `pickers.d`: each prints the paths to back up, one per line.

A picker that fails or hangs is killed and reported as a warning; the paths of the others still
count (a half-picked backup beats none). The run's exit code then becomes `EXIT_WARNINGS`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Files that are clearly not meant to run: editor backups, package manager leftovers, hidden files.
IGNORED_SUFFIXES = (
    "~",
    ".bak",
    ".orig",
    ".swp",
    ".swo",
    ".tmp",
    ".rpmnew",
    ".rpmsave",
    ".dpkg-old",
    ".dpkg-new",
    ".dpkg-dist",
    ".dpkg-tmp",
    ".ucf-old",
    ".ucf-new",
    ".ucf-dist",
)
IGNORED_PREFIXES = (".", "#")


@dataclass
class PickResult:
    paths: list[str] = field(default_factory=list)  # absolute, os.fsdecode()d, in picker order, unique
    warnings: list[str] = field(default_factory=list)


def runnable_scripts(directory: Path) -> Iterator[Path]:
    """Executables of `directory` in sorted order (like run-parts), skipping backups and non-executables."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir(), key=lambda p: os.fsencode(p.name)):
        name = path.name
        if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
            continue
        # is_file() follows symlinks: the seed allows pickers "symlinked into" the directory.
        if path.is_file() and os.access(path, os.X_OK):
            yield path


def run_pickers(directory: Path, timeout_s: float) -> PickResult:
    result = PickResult()
    seen: set[str] = set()
    for script in runnable_scripts(directory):
        output, warning = run_with_timeout([str(script)], timeout_s)
        if warning:
            result.warnings.append(f"picker {script.name}: {warning}")
        for path in parse_picked_lines(output, script.name, result.warnings):
            if path not in seen:
                seen.add(path)
                result.paths.append(path)
    return result


def parse_picked_lines(output: bytes, picker_name: str, warnings: list[str]) -> Iterator[str]:
    """Paths from a picker's stdout. Only the trailing newline is stripped: spaces are part of names."""
    for raw in output.split(b"\n"):
        if not raw:
            continue
        path = os.fsdecode(raw)
        if not path.startswith("/"):
            warnings.append(f"picker {picker_name}: ignored relative path {path!r}")
            continue
        if "\0" in path:
            warnings.append(f"picker {picker_name}: ignored path with NUL {path!r}")
            continue
        yield path


def run_with_timeout(argv: list[str], timeout_s: float) -> tuple[bytes, str | None]:
    """Run `argv`, return (stdout, warning or None). On timeout the whole process group is killed."""
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so `find` children die with it
        )
    except OSError as error:
        return b"", f"cannot run: {error}"
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, _ = process.communicate()
        # Only whole lines: a line cut mid-write could name a parent of what was meant.
        complete = stdout[: stdout.rfind(b"\n") + 1]
        return complete, f"killed after {timeout_s:g} s timeout; its complete lines so far were used"
    if process.returncode != 0:
        detail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return stdout, f"exited with status {process.returncode} {detail[0]}".rstrip()
    return stdout, None


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
