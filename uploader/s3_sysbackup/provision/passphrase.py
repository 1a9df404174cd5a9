"""The passphrase for encrypted credentials: from --passphrase-file, or typed (twice when encrypting)."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from .aws import ProvisionError


def read_passphrase(passphrase_file: Path | None, *, confirm: bool) -> str:
    if passphrase_file is not None:
        return _from_file(passphrase_file)
    if not sys.stdin.isatty():
        raise ProvisionError("no terminal to ask for a passphrase: pass --passphrase-file FILE")
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("passphrase again: ") != first:
        raise ProvisionError("the two passphrases differ")
    return first


def _from_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ProvisionError(f"cannot read passphrase file {path}: {error}") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ProvisionError(f"passphrase file {path} is empty (the passphrase is its first line)")
    return lines[0]
