"""Hashes and per-blob compression."""

import base64
import gzip
import hashlib
import os
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sysbackup_domain.compression import CODECS, compress_if_worth, decompress, decompress_zstd_at_most
from sysbackup_domain.errors import CorruptBlob
from sysbackup_domain.hashing import blob_hash, is_blob_hash, sha256_base64


def test_blob_hash_is_sha256_hex_of_the_plaintext() -> None:
    assert blob_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert blob_hash(memoryview(b"abc")) == blob_hash(b"abc")


def test_sha256_base64_is_what_s3_checksums_use() -> None:
    data = os.urandom(100)
    assert base64.b64decode(sha256_base64(data)) == hashlib.sha256(data).digest()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a" * 64, True),
        ("0123456789abcdef" * 4, True),
        ("A" * 64, False),
        ("a" * 63, False),
        ("a" * 65, False),
        ("g" * 64, False),
        ("a" * 63 + "\n", False),
        (b"a" * 64, False),
        (None, False),
    ],
)
def test_is_blob_hash(value: object, expected: bool) -> None:
    assert is_blob_hash(value) is expected


@given(st.binary(max_size=3000) | st.integers(0, 3000).map(lambda n: b"abc" * n))
def test_compress_then_decompress_round_trips(data: bytes) -> None:
    codec, stored = compress_if_worth(data)
    assert codec in ("zstd", "none")
    if codec == "zstd":
        assert len(stored) * 16 <= len(data) * 15  # it saved at least 1/16
    else:
        assert stored == data
    assert decompress(codec, stored, len(data)) == data


def test_incompressible_data_is_stored_as_is() -> None:
    data = os.urandom(64 * 1024)
    assert compress_if_worth(data) == ("none", data)


def test_gzip_blobs_are_readable() -> None:
    data = b"hello gzip " * 100
    assert decompress("gzip", gzip.compress(data), len(data)) == data


@pytest.mark.parametrize("codec", CODECS)
def test_wrong_raw_length_is_corrupt(codec: str) -> None:
    data = b"some text " * 50
    stored = {"none": data, "zstd": compress_if_worth(data)[1], "gzip": gzip.compress(data)}[codec]
    with pytest.raises(CorruptBlob, match="expected"):
        decompress(codec, stored, len(data) - 1)
    with pytest.raises(CorruptBlob, match="expected"):
        decompress(codec, stored, len(data) + 1)


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_garbage_is_corrupt(codec: str) -> None:
    with pytest.raises(CorruptBlob):
        decompress(codec, b"\x28\xb5\x2f\xfd garbage" if codec == "zstd" else b"\x1f\x8b garbage", 10)


def test_truncated_gzip_is_corrupt() -> None:
    data = os.urandom(1000)
    with pytest.raises(CorruptBlob):
        decompress("gzip", gzip.compress(data)[:-10], len(data))


def test_unknown_codec_and_bad_length_are_refused() -> None:
    with pytest.raises(CorruptBlob, match="unknown codec"):
        decompress("lz4", b"", 0)
    with pytest.raises(CorruptBlob, match="raw_length"):
        decompress("none", b"", -1)


def test_decompress_zstd_at_most_refuses_to_inflate_past_the_cap() -> None:
    _, stored = compress_if_worth(b"\0" * 100_000)
    assert decompress_zstd_at_most(stored, 100_000) == b"\0" * 100_000
    with pytest.raises(CorruptBlob, match="more than"):
        decompress_zstd_at_most(stored, 99_999)


def test_compression_is_safe_from_many_threads() -> None:
    inputs = [(b"thread %d " % index) * 5000 for index in range(16)]
    results: dict[int, tuple[str, bytes]] = {}

    def work(index: int) -> None:
        for _ in range(20):
            results[index] = compress_if_worth(inputs[index])

    threads = [threading.Thread(target=work, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (codec, stored) in results.items():
        assert decompress(codec, stored, len(inputs[index])) == inputs[index]
