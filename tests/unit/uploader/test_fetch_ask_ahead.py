"""A restore asks for its download URLs while it fetches the manifest: the first locate needs no call."""

from __future__ import annotations

import threading

from s3_sysbackup.fetch import BlobFetcher
from s3_sysbackup.index_rebuild import MemoryIndex
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import PackWriter


def test_urls_asked_ahead_serve_the_first_locate(backend, transfer, monkeypatch) -> None:
    writer = PackWriter()
    writer.add(blob_hash(b"a blob"), "data", b"a blob")
    data, _ = writer.finish()
    backend.store_pack(data)
    index = MemoryIndex()
    fetcher = BlobFetcher(backend, transfer, index)  # type: ignore[arg-type]
    fetcher.rebuild_index()  # the index knows the host's one pack (GET /packs)

    may_answer = threading.Event()
    real_download_urls = backend.download_urls

    def slow_download_urls(pack_ids, host=None):
        assert may_answer.wait(timeout=5)  # the caller went on while this call was out
        return real_download_urls(pack_ids, host)

    monkeypatch.setattr(backend, "download_urls", slow_download_urls)
    calls = backend.counter.as_dict().get("api", {}).get("POST /downloads", 0)
    fetcher.ask_urls_ahead()
    may_answer.set()  # reached only because ask_urls_ahead did not wait for the answer
    assert dict(fetcher.fetch([blob_hash(b"a blob")])) == {blob_hash(b"a blob"): b"a blob"}
    assert backend.counter.as_dict()["api"]["POST /downloads"] == calls + 1  # the early call, no other


def test_a_failed_early_ask_is_asked_again(backend, transfer, monkeypatch) -> None:
    writer = PackWriter()
    writer.add(blob_hash(b"b blob"), "data", b"b blob")
    data, _ = writer.finish()
    backend.store_pack(data)
    fetcher = BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]
    fetcher.rebuild_index()
    real_download_urls = backend.download_urls
    failures = iter([ConnectionError("the restore function is not there yet")])

    def flaky_download_urls(pack_ids, host=None):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_download_urls(pack_ids, host)

    monkeypatch.setattr(backend, "download_urls", flaky_download_urls)
    fetcher.ask_urls_ahead()
    assert dict(fetcher.fetch([blob_hash(b"b blob")])) == {blob_hash(b"b blob"): b"b blob"}
