"""Streamed ranged reads: a GET's blobs are verified as they arrive, handed over in bounded memory,
and a GET cut short is asked again from the first blob not yet handed over."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from s3_sysbackup.api import PackDownloads
from s3_sysbackup.fetch import (
    ALL_URLS_UP_TO_PACKS,
    READ_GROUP_BYTES,
    BlobFetcher,
    ConsumerGone,
    DecodedBlobs,
    read_groups,
)
from s3_sysbackup.index_rebuild import MemoryIndex
from s3_sysbackup.transfer import Transfer, TransferError
from sysbackup_domain.errors import CorruptBlob
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import PackEntry, PackWriter

PACK_ID = "ab" * 32


class RangeServer(ThreadingHTTPServer):
    """Serves one object with S3's Range semantics; can cut a body short or ignore Range."""

    def __init__(self, data: bytes) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.data = data
        self.ranges: list[str | None] = []  # the Range header of every GET
        self.cut_after: list[int] = []  # per coming GET: send this many body bytes, then close
        self.ignore_range = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/pack"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that stops reading early breaks the pipe: expected here


class RangeHandler(BaseHTTPRequestHandler):
    server: RangeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        wanted = self.headers.get("Range")
        self.server.ranges.append(wanted)
        data, status = self.server.data, 200
        if wanted and not self.server.ignore_range:
            first, last = wanted.removeprefix("bytes=").split("-")
            data, status = data[int(first) : int(last) + 1], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.server.cut_after:
            self.wfile.write(data[: self.server.cut_after.pop(0)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture
def serve() -> Iterator:
    servers: list[RangeServer] = []

    def start(data: bytes) -> RangeServer:
        server = RangeServer(data)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class UrlApi:
    """POST /downloads: always the one server's URL; counts the calls."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.calls = 0

    def download_urls(self, pack_ids: Iterable[str], host: str | None = None) -> PackDownloads:
        self.calls += 1
        self.asked = set(pack_ids)
        return PackDownloads(urls={p: self.url for p in pack_ids}, sizes={}, missing={})


def packed(blobs: list[bytes]) -> tuple[bytes, MemoryIndex]:
    """One pack holding `blobs` (incompressible, so stored = plaintext) and an index of it."""
    writer = PackWriter()
    for data in blobs:
        writer.add(blob_hash(data), "data", data)
    pack, entries = writer.finish()
    index = MemoryIndex()
    index.record_pack(PACK_ID, len(pack), entries)
    return pack, index


def test_a_range_is_read_in_exact_pieces_and_gaps_are_skipped(serve):
    data = os.urandom(3 * 1024 * 1024)
    server = serve(data)
    with Transfer().open_range(server.url, 100, 2 * 1024 * 1024) as body:
        assert body.read_exact(10) == data[100:110]
        body.skip(1024 * 1024 + 5)  # more than one skip piece
        assert body.read_exact(7) == data[100 + 10 + 1024 * 1024 + 5 :][:7]
        assert body.remaining == 2 * 1024 * 1024 - 10 - (1024 * 1024 + 5) - 7
        with pytest.raises(ValueError):
            body.read_exact(body.remaining + 1)  # never past the range
    assert server.ranges == [f"bytes=100-{100 + 2 * 1024 * 1024 - 1}"]


def test_a_server_that_ignores_range_still_gives_the_ranges_bytes(serve):
    data = os.urandom(50_000)
    server = serve(data)
    server.ignore_range = True
    with Transfer().open_range(server.url, 1234, 5000) as body:
        assert body.read_exact(5000) == data[1234:6234]


def test_a_body_cut_short_is_a_transfer_error(serve):
    server = serve(os.urandom(100_000))
    server.cut_after = [40_000]
    with Transfer().open_range(server.url, 0, 100_000) as body:
        body.read_exact(30_000)
        with pytest.raises(TransferError):
            body.read_exact(30_000)


def test_an_empty_blob_costs_no_request(serve):
    pack, index = packed([b""])
    server = serve(pack)
    fetcher = BlobFetcher(UrlApi(server.url), Transfer(), index)  # type: ignore[arg-type]
    assert dict(fetcher.fetch([blob_hash(b"")])) == {blob_hash(b""): b""}
    assert server.ranges == []


def test_a_cut_get_is_asked_again_from_the_first_blob_not_handed_over(serve):
    size = READ_GROUP_BYTES * 3 // 4  # one blob a read group
    blobs = [os.urandom(size) for _ in range(5)]
    pack, index = packed(blobs)
    server = serve(pack)
    server.cut_after = [size * 5 // 2]  # the first GET delivers two whole blobs, then dies in the third
    api = UrlApi(server.url)
    fetcher = BlobFetcher(api, Transfer(attempts=1), index)  # type: ignore[arg-type]
    got = dict(fetcher.fetch(blob_hash(b) for b in blobs))
    assert got == {blob_hash(b): b for b in blobs}
    entries = sorted(index.locate(got).values(), key=lambda blob: blob.entry.offset)
    third = entries[2].entry.offset
    assert server.ranges[1].startswith(f"bytes={third}-")  # not from the start again
    assert api.calls == 2  # the first URL, then a fresh one for the second GET


def test_a_get_that_keeps_failing_without_progress_gives_up(serve):
    blobs = [os.urandom(50_000) for _ in range(2)]
    pack, index = packed(blobs)
    server = serve(pack)
    server.cut_after = [10, 10, 10]
    fetcher = BlobFetcher(UrlApi(server.url), Transfer(attempts=1), index)  # type: ignore[arg-type]
    with pytest.raises(TransferError):
        list(fetcher.fetch(blob_hash(b) for b in blobs))
    assert len(server.ranges) == 2  # one fresh URL, then no more


def test_a_streamed_blob_that_does_not_hash_is_refused(serve):
    blobs = [os.urandom(20_000) for _ in range(3)]
    pack, index = packed(blobs)
    flipped = bytearray(pack)
    flipped[25_000] ^= 1  # inside the second blob
    server = serve(bytes(flipped))
    fetcher = BlobFetcher(UrlApi(server.url), Transfer(), index)  # type: ignore[arg-type]
    with pytest.raises(CorruptBlob):
        list(fetcher.fetch(blob_hash(b) for b in blobs))


def test_closing_the_blobs_early_stops_the_get_threads(serve):
    blobs = [os.urandom(300_000) for _ in range(40)]  # 12 MB: more than is decoded ahead
    pack, index = packed(blobs)
    server = serve(pack)
    fetcher = BlobFetcher(UrlApi(server.url), Transfer(), index)  # type: ignore[arg-type]
    before = threading.active_count()
    stream = fetcher.fetch(blob_hash(b) for b in blobs)
    next(stream)
    stream.close()
    assert threading.active_count() <= before + 1  # the server's idle handler thread, at most
    assert not [t for t in threading.enumerate() if t.name.startswith("get")]


def index_of_packs(count: int, blobs: list[bytes]) -> MemoryIndex:
    """`packed(blobs)` as PACK_ID, and `count - 1` other packs the index knows."""
    _, index = packed(blobs)
    for n in range(count - 1):
        index.record_pack(f"{n:064x}", 100, [PackEntry(f"{n + 1:064x}", "data", "none", 0, 1, 1)])
    return index


def test_a_small_index_gets_every_url_in_the_first_call(serve):
    blobs = [os.urandom(1000)]
    server = serve(packed(blobs)[0])
    api = UrlApi(server.url)
    index = index_of_packs(ALL_URLS_UP_TO_PACKS, blobs)
    fetcher = BlobFetcher(api, Transfer(), index)  # type: ignore[arg-type]
    list(fetcher.fetch([blob_hash(blobs[0])]))
    assert api.asked == set(index.known_packs())  # the other packs' blobs come without another call
    fetcher.locate([f"{1:064x}"])
    assert api.calls == 1


def test_a_big_index_gets_only_the_urls_needed(serve):
    blobs = [os.urandom(1000)]
    server = serve(packed(blobs)[0])
    api = UrlApi(server.url)
    fetcher = BlobFetcher(api, Transfer(), index_of_packs(ALL_URLS_UP_TO_PACKS + 1, blobs))  # type: ignore[arg-type]
    list(fetcher.fetch([blob_hash(blobs[0])]))
    assert api.asked == {PACK_ID}


def test_small_blobs_are_read_in_groups_and_a_big_one_alone():
    def entry(n: int, offset: int, raw_length: int) -> PackEntry:
        return PackEntry(f"{n:064x}", "data", "zstd", offset, 10, raw_length)

    small = [entry(n, 10 * n, READ_GROUP_BYTES // 4) for n in range(6)]
    big = entry(6, 60, READ_GROUP_BYTES * 2)
    groups = list(read_groups([*small, big, entry(7, 70, 1)]))
    assert [[e.hash for e in g] for g in groups] == [
        [e.hash for e in small[:4]],
        [e.hash for e in small[4:]],
        [big.hash],
        [f"{7:064x}"],
    ]


def test_producers_wait_for_room_and_the_consumer_sees_every_blob():
    blobs = DecodedBlobs(limit=100, producers=1)
    queued: list[int] = []

    def produce() -> None:
        for n in range(5):
            blobs.put(str(n), bytes(60))
            queued.append(n)
        blobs.producer_done()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.2)
    assert queued == [0]  # a second 60-byte blob would pass the 100-byte limit
    assert [digest for digest, _ in blobs] == ["0", "1", "2", "3", "4"]


def test_a_blob_larger_than_the_limit_passes_alone():
    blobs = DecodedBlobs(limit=10, producers=1)
    blobs.put("big", bytes(50))
    blobs.producer_done()
    assert [(digest, len(data)) for digest, data in blobs] == [("big", 50)]


def test_a_producers_error_reaches_the_consumer():
    blobs = DecodedBlobs(limit=100, producers=2)
    blobs.put("a", b"x")
    blobs.producer_done(CorruptBlob("bad blob"))
    with pytest.raises(CorruptBlob, match="bad blob"):
        list(blobs)


def test_stopping_wakes_a_producer_waiting_for_room():
    blobs = DecodedBlobs(limit=10, producers=1)
    blobs.put("a", bytes(10))
    outcome: list[str] = []

    def produce() -> None:
        try:
            blobs.put("b", bytes(10))
        except ConsumerGone:
            outcome.append("gone")

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.1)
    blobs.stop()
    producer.join(timeout=5)
    assert outcome == ["gone"]
