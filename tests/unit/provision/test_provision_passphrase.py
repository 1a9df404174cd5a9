"""The passphrase: typed twice on a terminal when encrypting, or read from --passphrase-file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_sysbackup.provision import passphrase
from s3_sysbackup.provision.aws import ProvisionError


def typed(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[str]:
    """A terminal on which the user types `answers` in turn; returns the prompts shown."""
    prompts: list[str] = []
    replies: Iterator[str] = iter(answers)

    def getpass(prompt: str) -> str:
        prompts.append(prompt)
        return next(replies)

    monkeypatch.setattr(passphrase.sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(passphrase.getpass, "getpass", getpass)
    return prompts


def test_encrypting_asks_twice_and_accepts_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = typed(monkeypatch, "long enough phrase", "long enough phrase")
    assert passphrase.read_passphrase(None, confirm=True) == "long enough phrase"
    assert len(prompts) == 2


def test_a_mistyped_confirmation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    typed(monkeypatch, "long enough phrase", "long enough phrasE")
    with pytest.raises(ProvisionError, match="differ"):
        passphrase.read_passphrase(None, confirm=True)


def test_decrypting_asks_once(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = typed(monkeypatch, "long enough phrase")
    assert passphrase.read_passphrase(None, confirm=False) == "long enough phrase"
    assert len(prompts) == 1


def test_the_file_gives_its_first_line_without_the_newline(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_text("first line  \nsecond\n")
    assert passphrase.read_passphrase(path, confirm=True) == "first line  "


@pytest.mark.parametrize("content", ["", "\nsecond line\n"])
def test_an_empty_first_line_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "pass"
    path.write_text(content)
    with pytest.raises(ProvisionError, match="empty"):
        passphrase.read_passphrase(path, confirm=False)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="nowhere"):
        passphrase.read_passphrase(tmp_path / "nowhere", confirm=False)
