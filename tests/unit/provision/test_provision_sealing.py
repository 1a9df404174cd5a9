"""Encrypted credentials: both formats round-trip; a wrong passphrase or any damage is refused."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from s3_sysbackup.provision import sealing
from s3_sysbackup.provision.sealing import SealError, seal, unseal

PLAINTEXT = b"[default]\naws_access_key_id = AKIAEXAMPLEEXAMPLE12\naws_secret_access_key = s3cr3t/Value+x\n"
PASSPHRASE = "correct horse battery"

needs_ccrypt = pytest.mark.skipif(shutil.which("ccrypt") is None, reason="ccrypt is not installed")


def test_aes_gcm_round_trips_and_never_contains_the_plaintext() -> None:
    sealed = seal(PLAINTEXT, PASSPHRASE, fmt="aes-gcm")
    assert sealed.startswith(sealing.MAGIC)
    assert b"AKIAEXAMPLE" not in sealed and b"s3cr3t" not in sealed
    assert unseal(sealed, PASSPHRASE) == PLAINTEXT


def test_aes_gcm_uses_a_fresh_salt_and_nonce_each_time() -> None:
    assert seal(PLAINTEXT, PASSPHRASE, fmt="aes-gcm") != seal(PLAINTEXT, PASSPHRASE, fmt="aes-gcm")


def test_aes_gcm_refuses_a_wrong_passphrase() -> None:
    sealed = seal(PLAINTEXT, PASSPHRASE, fmt="aes-gcm")
    with pytest.raises(SealError, match="wrong passphrase"):
        unseal(sealed, PASSPHRASE + "!")


@pytest.mark.parametrize(
    "position",
    [
        len(sealing.MAGIC),  # salt: another key
        len(sealing.MAGIC) + sealing.SALT_BYTES,  # nonce
        len(sealing.MAGIC) + sealing.SALT_BYTES + sealing.NONCE_BYTES,  # first ciphertext byte
        -1,  # last byte of the tag
    ],
    ids=["salt", "nonce", "ciphertext", "tag"],
)
def test_aes_gcm_refuses_any_flipped_bit(position: int) -> None:
    damaged = bytearray(seal(PLAINTEXT, PASSPHRASE, fmt="aes-gcm"))
    damaged[position] ^= 0x01
    with pytest.raises(SealError, match="damaged"):
        unseal(bytes(damaged), PASSPHRASE)


def test_aes_gcm_refuses_a_truncated_file() -> None:
    sealed = seal(PLAINTEXT, PASSPHRASE, fmt="aes-gcm")
    with pytest.raises(SealError):
        unseal(sealed[: len(sealing.MAGIC) + 20], PASSPHRASE)
    with pytest.raises(SealError):
        unseal(sealed[:-1], PASSPHRASE)


@pytest.mark.parametrize("passphrase", ["short", "two\nlines here"])
def test_weak_or_multi_line_passphrases_are_refused(passphrase: str) -> None:
    with pytest.raises(SealError, match="passphrase"):
        seal(PLAINTEXT, passphrase, fmt="aes-gcm")


@needs_ccrypt
def test_ccrypt_round_trips_and_opens_with_ccrypt_itself(tmp_path: Path) -> None:
    sealed = seal(PLAINTEXT, PASSPHRASE, fmt="ccrypt")
    assert not sealed.startswith(sealing.MAGIC) and PLAINTEXT not in sealed
    assert unseal(sealed, PASSPHRASE) == PLAINTEXT
    # Compatible: the plain ccrypt program decrypts it with the same keyword.
    keyfile = tmp_path / "key"
    keyfile.write_text(PASSPHRASE + "\n")
    completed = subprocess.run(
        ["ccrypt", "-d", "-k", str(keyfile)], input=sealed, capture_output=True, check=True
    )
    # ...and reads the credentials plus one comment line (the checksum ccrypt itself lacks).
    assert completed.stdout.startswith(PLAINTEXT)
    assert completed.stdout[len(PLAINTEXT) :].startswith(b"# ")
    assert completed.stdout.count(b"\n") == PLAINTEXT.count(b"\n") + 1


@needs_ccrypt
@pytest.mark.parametrize("position", [0, 40, -2], ids=["first", "middle", "last"])
def test_ccrypt_damage_is_caught_by_the_checksum_line(position: int) -> None:
    damaged = bytearray(seal(PLAINTEXT, PASSPHRASE, fmt="ccrypt"))
    damaged[position] ^= 0x04
    with pytest.raises(SealError):
        unseal(bytes(damaged), PASSPHRASE)


@needs_ccrypt
def test_ccrypt_refuses_a_wrong_passphrase() -> None:
    sealed = seal(PLAINTEXT, PASSPHRASE, fmt="ccrypt")
    with pytest.raises(SealError, match="wrong passphrase"):
        unseal(sealed, "another passphrase")


def test_the_default_format_follows_whether_ccrypt_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealing.shutil, "which", lambda name: None)
    assert sealing.default_format() == "aes-gcm"
    assert seal(PLAINTEXT, PASSPHRASE).startswith(sealing.MAGIC)
    monkeypatch.setattr(sealing.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert sealing.default_format() == "ccrypt"


def test_a_ccrypt_file_without_ccrypt_installed_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sealing.shutil, "which", lambda name: None)
    with pytest.raises(SealError, match="ccrypt` is not installed"):
        unseal(b"\x8a" * 64, PASSPHRASE)
