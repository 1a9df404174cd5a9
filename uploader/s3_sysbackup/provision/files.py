"""Writing a host's files safely: private files atomically with mode 0600, never clobbering by accident."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .aws import ProvisionError


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise ProvisionError(f"{path} already exists (pass --force to replace it)")


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write a temporary file with `mode` from the start, fsync, rename over `path`.

    The mode is set at creation, so a secret is never readable by others even for an instant, and a
    crash leaves either the old file or the new one, never half of it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)  # the umask may have narrowed it further than asked; be exact
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
