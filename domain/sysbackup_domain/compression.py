"""Per-blob compression: zstd when it pays, stored as-is otherwise.

Readers accept every codec in CODECS (gzip for blobs written by other tools or older writers);
writers only ever choose zstd or none.
"""

import threading
import zlib

import zstandard

from sysbackup_domain.errors import CorruptBlob

CODECS = ("none", "zstd", "gzip")

# Level 3 (zstd's default), by measurement (bench/chunking.py, stdlib sources in 1 MiB blobs, one core):
#   zstd -1: ratio 0.214, 527 MiB/s;  zstd -3: 0.197, 394 MiB/s;  zstd -6: 0.174, 148 MiB/s;
#   gzip -6: 0.205, 52 MiB/s.  Decompression is ~1.5-2 GiB/s for every zstd level.
# Level 3 keeps compression well ahead of upload links and of chunk+hash (~1.2 GiB/s) when spread over
# worker threads; level 6 saves another 12% of storage for 2.7x the host CPU of a first run.
ZSTD_LEVEL = 3

# A blob is compressed only when it shrinks by at least 1/16: below that, the saving in storage
# does not pay for the CPU spent decompressing on every restore.
_MIN_SAVING_DENOMINATOR = 16

# zstandard's compressor objects are not thread-safe; the pipeline compresses in worker threads.
_thread_state = threading.local()

# Decompression reads in steps of this size, so memory follows the output, not a hostile header.
_DECOMPRESS_READ_BYTES = 1024 * 1024


def _compressor() -> zstandard.ZstdCompressor:
    compressor = getattr(_thread_state, "compressor", None)
    if compressor is None:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        _thread_state.compressor = compressor
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_thread_state, "decompressor", None)
    if decompressor is None:
        decompressor = zstandard.ZstdDecompressor()
        _thread_state.decompressor = decompressor
    return decompressor


def is_worth_it(raw_length: int, compressed_length: int) -> bool:
    """True if compression saves at least 1/16 of the raw size."""
    return compressed_length * _MIN_SAVING_DENOMINATOR <= raw_length * (_MIN_SAVING_DENOMINATOR - 1)


def compress_if_worth(data: bytes | bytearray | memoryview) -> tuple[str, bytes]:
    """("zstd", compressed) if that saves >= 1/16, else ("none", data). Safe from several threads."""
    raw = bytes(data)
    if not raw:
        return "none", raw
    compressed = _compressor().compress(raw)
    if is_worth_it(len(raw), len(compressed)):
        return "zstd", compressed
    return "none", raw


def compress_zstd(data: bytes | bytearray | memoryview) -> bytes:
    """Always zstd (for documents such as pack trailers, which are always compressed)."""
    return _compressor().compress(bytes(data))


def decompress(codec: str, data: bytes | bytearray | memoryview, raw_length: int) -> bytes:
    """Decode a stored blob, which must yield exactly `raw_length` bytes.

    Memory stays within `raw_length` + 1 MiB whatever the (untrusted) frame headers claim, so a
    hostile "zip bomb" cannot exhaust a Lambda. Raises CorruptBlob on any failure.
    """
    if codec not in CODECS:
        raise CorruptBlob(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    if not isinstance(raw_length, int) or isinstance(raw_length, bool) or raw_length < 0:
        raise CorruptBlob(f"raw_length must be a non-negative integer, got {raw_length!r}")
    if codec == "none":
        plaintext = bytes(data)
    elif codec == "zstd":
        plaintext = _zstd_decompress_bounded(data, raw_length)
    else:
        plaintext = _gzip_decompress_bounded(data, raw_length)
    if len(plaintext) != raw_length:
        raise CorruptBlob(f"{codec} blob decodes to {len(plaintext)} bytes, expected {raw_length}")
    return plaintext


def _zstd_decompress_bounded(data: bytes | bytearray | memoryview, raw_length: int) -> bytes:
    # ZstdDecompressor.decompress() trusts the frame's content-size header for its allocation: it is
    # used only when that header says exactly the expected size (what our writers make; half the time
    # of a small blob's stream reader, which matters across 100k blobs). Anything else, and any error,
    # goes through a stream reader with bounded reads, which trusts no header and names the problem.
    frame = bytes(data)
    try:
        if zstandard.frame_content_size(frame) == raw_length:
            return _decompressor().decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError:
        pass
    limit = raw_length + 1  # one byte more than expected is enough to detect "too long"
    parts: list[bytes] = []
    received = 0
    try:
        with _decompressor().stream_reader(frame, read_across_frames=True) as reader:
            while received < limit:
                part = reader.read(min(_DECOMPRESS_READ_BYTES, limit - received))
                if not part:
                    break
                parts.append(part)
                received += len(part)
    except zstandard.ZstdError as error:
        raise CorruptBlob(f"zstd blob does not decode: {error}") from error
    if received == 0 and raw_length > 0:
        raise CorruptBlob("zstd blob decodes to nothing")
    return b"".join(parts)


def _gzip_decompress_bounded(data: bytes | bytearray | memoryview, raw_length: int) -> bytes:
    decoder = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer (CRC checked by zlib)
    try:
        plaintext = decoder.decompress(bytes(data), raw_length + 1)
    except zlib.error as error:
        raise CorruptBlob(f"gzip blob does not decode: {error}") from error
    if len(plaintext) <= raw_length and not decoder.eof:
        raise CorruptBlob("gzip blob is truncated")
    return plaintext


def decompress_zstd_at_most(data: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
    """Decode a zstd document of unknown size, refusing (CorruptBlob) to produce more than `max_bytes`."""
    plaintext = _zstd_decompress_bounded(data, max_bytes)
    if len(plaintext) > max_bytes:
        raise CorruptBlob(f"zstd data decodes to more than {max_bytes} bytes")
    return plaintext
