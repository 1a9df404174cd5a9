"""Credentials encrypted under a passphrase, for carrying them to another host.

Two formats, as the seed asks: ccrypt's (when the `ccrypt` program is installed, it is called, so the
file opens with plain `ccdecrypt` too), else an authenticated one built from the `cryptography` library:

    MAGIC | salt (16) | nonce (12) | AES-256-GCM(ciphertext + 16-byte tag)

with the key from scrypt(passphrase, salt, n=2**15, r=8, p=1) and the MAGIC+salt+nonce header as
associated data, so any changed byte, or a wrong passphrase, fails the tag check. ccrypt has only a
32-bit key check and no integrity at all (a flipped bit decrypts to a changed secret), so before ccrypt
encrypts, a last comment line `# s3-sysbackup-sha256 <hex of the text above>` is added: harmless to
`ccdecrypt` users (a comment in a credentials file), checked by `unseal`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from typing import Literal

from .aws import ProvisionError

MAGIC = b"S3SBSEAL1\n"
SALT_BYTES = 16
NONCE_BYTES = 12
KEY_BYTES = 32
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
MIN_PASSPHRASE_CHARS = 8
CHECKSUM_PREFIX = b"# s3-sysbackup-sha256 "

Format = Literal["ccrypt", "aes-gcm"]


class SealError(ProvisionError):
    """Encryption or decryption failed; nothing was written."""


def check_passphrase(passphrase: str) -> bytes:
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise SealError(f"the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")
    if "\n" in passphrase or "\r" in passphrase:
        raise SealError("the passphrase must be a single line")
    return passphrase.encode("utf-8")


def default_format() -> Format:
    return "ccrypt" if shutil.which("ccrypt") else "aes-gcm"


def seal(plaintext: bytes, passphrase: str, fmt: Format | None = None) -> bytes:
    key = check_passphrase(passphrase)
    if (fmt or default_format()) == "ccrypt":
        return _run_ccrypt("-e", with_checksum_line(plaintext), key)
    return _seal_aes_gcm(plaintext, key)


def unseal(sealed: bytes, passphrase: str) -> bytes:
    """The plaintext; SealError for a wrong passphrase or a damaged file (never partial output)."""
    key = passphrase.encode("utf-8")
    if sealed.startswith(MAGIC):
        return _unseal_aes_gcm(sealed, key)
    if not shutil.which("ccrypt"):
        raise SealError(
            "this file is not in s3-sysbackup's own format, so it would be a ccrypt file, "
            "but `ccrypt` is not installed here (apt install ccrypt)"
        )
    return without_checksum_line(_run_ccrypt("-d", sealed, key))


# ---------------------------------------------------------------- ccrypt


def with_checksum_line(text: bytes) -> bytes:
    body = text if text.endswith(b"\n") else text + b"\n"
    return body + CHECKSUM_PREFIX + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n"


def without_checksum_line(text: bytes) -> bytes:
    body, _, last_line = text.rstrip(b"\n").rpartition(b"\n")
    body += b"\n"
    if not last_line.startswith(CHECKSUM_PREFIX):
        raise SealError(
            "the decrypted file has no s3-sysbackup checksum line: damaged, or not from write-config"
        )
    if last_line.removeprefix(CHECKSUM_PREFIX) != hashlib.sha256(body).hexdigest().encode("ascii"):
        raise SealError("the decrypted file does not match its checksum: the file was damaged")
    return body


def _run_ccrypt(mode: str, data: bytes, key: bytes) -> bytes:
    """ccrypt as a filter; the key travels through a pipe, never argv or the environment."""
    ccrypt = shutil.which("ccrypt")
    if ccrypt is None:
        raise SealError("`ccrypt` is not installed")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, key + b"\n")  # far below the pipe buffer: cannot block
        os.close(write_end)
        write_end = -1
        completed = subprocess.run(
            [ccrypt, mode, "-f", "-k", f"/dev/fd/{read_end}"],
            input=data,
            capture_output=True,
            pass_fds=(read_end,),
            check=False,
        )
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if completed.returncode != 0:
        detail = completed.stderr.decode("utf-8", "replace").strip()
        if mode == "-d":
            raise SealError(f"cannot decrypt: wrong passphrase, or not a ccrypt file ({detail})")
        raise SealError(f"ccrypt failed: {detail}")
    return completed.stdout


# ---------------------------------------------------------------- scrypt + AES-GCM


def _aes_gcm_key(key: bytes, salt: bytes) -> bytes:
    try:
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError:
        raise SealError(
            "encrypting without ccrypt needs the `cryptography` package: "
            "pip install 's3-sysbackup[provision]' (or install ccrypt)"
        ) from None
    return Scrypt(salt=salt, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(key)


def _seal_aes_gcm(plaintext: bytes, key: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt = os.urandom(SALT_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    header = MAGIC + salt + nonce
    return header + AESGCM(_aes_gcm_key(key, salt)).encrypt(nonce, plaintext, header)


def _unseal_aes_gcm(sealed: bytes, key: bytes) -> bytes:
    header_length = len(MAGIC) + SALT_BYTES + NONCE_BYTES
    if len(sealed) < header_length + 16:
        raise SealError("the encrypted file is truncated")
    salt = sealed[len(MAGIC) : len(MAGIC) + SALT_BYTES]
    nonce = sealed[len(MAGIC) + SALT_BYTES : header_length]
    derived = _aes_gcm_key(key, salt)
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(derived).decrypt(nonce, sealed[header_length:], sealed[:header_length])
    except InvalidTag:
        raise SealError("cannot decrypt: wrong passphrase, or the file was damaged") from None
