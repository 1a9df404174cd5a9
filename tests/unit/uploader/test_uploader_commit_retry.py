"""A commit refused (422) because the local index vouched for packs gc condemned, repacked or deleted:
the host forgets what the refusal names, re-lists its packs (GET /packs) for ones it does not know,
sends what is still missing and commits again (docs/PACK_INDEX.md). Also: presign's 409 `collecting`.
The fake backend refuses as the contract says (uploader_fakes: a walk over the listed packs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import pick
from s3_sysbackup import cache as cache_module
from s3_sysbackup import sink as sink_module
from s3_sysbackup.api import ApiError
from s3_sysbackup.archiver import ArchiveOptions, Archiver, CommitRefused
from s3_sysbackup.fetch import BlobFetcher
from s3_sysbackup.index_rebuild import MemoryIndex
from s3_sysbackup.restorer import Restorer
from s3_sysbackup.sink import FAULT_ENV, InjectedFault
from sysbackup_domain.packs import parse_trailer
from uploader_fakes import FakeBackend


@pytest.fixture(autouse=True)
def trust_fresh_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "RACY_WINDOW_NS", 0)


def write_files(root: Path) -> Path:
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_bytes(b"first file\n" * 50)
    (data / "sub" / "b.txt").write_bytes(b"second file\n" * 70)
    return data


def crash_after_index(run_archive, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "after-index")
    with pytest.raises(InjectedFault):
        run_archive()
    monkeypatch.delenv(FAULT_ENV)


def restored_bytes(backend: FakeBackend, transfer, manifest_id: str, target: Path, path: str) -> bytes:
    fetcher = BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]
    Restorer(fetcher, str(target)).restore(backend.get_manifest(manifest_id))
    return (target / path).read_bytes()


def uncommitted_data_pack(backend: FakeBackend, transfer, already: set[str]) -> str:
    """The data pack a crashed run put that no manifest holds."""
    (pack_id,) = [
        p for p in transfer.puts if p not in already and parse_trailer(backend.objects[p])[0].kind == "data"
    ]
    return pack_id


def test_a_pack_gc_collected_under_the_index_is_sent_again(
    run_archive, config_dir, host_root, backend, transfer, monkeypatch, tmp_path
) -> None:
    data = write_files(host_root)
    pick(config_dir, "/data")
    run_archive()
    (data / "a.txt").write_bytes(b"new content\n" * 40)
    before = set(transfer.puts)
    crash_after_index(run_archive, monkeypatch)  # the new content's pack is indexed, never committed
    orphan = uncommitted_data_pack(backend, transfer, before)
    backend.condemn(orphan)
    backend.collect(orphan)  # gc: no manifest holds it, the grace period went by

    result = run_archive()

    assert backend.head == result.manifest_id
    assert transfer.puts.count(orphan) == 2  # refused as unknown, forgotten, read again and sent again
    refused = [r for r in backend.commit_requests if orphan in r["packs"]]
    assert refused  # the first commit listed the collected pack
    assert restored_bytes(backend, transfer, result.manifest_id, tmp_path / "r", "data/a.txt") == (
        b"new content\n" * 40
    )


def test_a_repacked_pack_is_found_by_listing_the_packs_again(
    run_archive, config_dir, host_root, backend, transfer, monkeypatch, tmp_path
) -> None:
    data = write_files(host_root)
    pick(config_dir, "/data")
    run_archive()
    (data / "a.txt").write_bytes(b"repacked content\n" * 40)
    before = set(transfer.puts)
    crash_after_index(run_archive, monkeypatch)
    old = uncommitted_data_pack(backend, transfer, before)
    new = backend.repack(old)  # gc copied its blobs into `new` and condemned `old`
    puts_before = len(transfer.puts)
    calls_before = dict(backend.counter.as_dict()["api"])

    result = run_archive()

    assert backend.head == result.manifest_id
    assert len(transfer.puts) == puts_before  # nothing sent again: the blobs are in the repacked pack
    assert new in backend.commit_requests[-1]["packs"] and old not in backend.commit_requests[-1]["packs"]
    calls = backend.counter.as_dict()["api"]
    assert calls["POST /manifests"] - calls_before["POST /manifests"] == 2  # refused once, then accepted
    assert calls["GET /packs"] - calls_before.get("GET /packs", 0) == 1
    assert restored_bytes(backend, transfer, result.manifest_id, tmp_path / "r", "data/a.txt") == (
        b"repacked content\n" * 40
    )


@dataclass
class RefusingBackend(FakeBackend):
    """Refuses every commit, naming a pack that does not exist (a backend gone wrong)."""

    def commit_manifest(self, body: Mapping[str, Any]) -> dict:
        self._count("POST /manifests")
        answer = {"message": "refused", "missing": [], "packs": {"f" * 64: "unknown"}}
        raise ApiError("POST /manifests", 422, "refused", answer)


def test_a_commit_that_never_converges_fails_clearly(make_config, config_dir, host_root, transfer) -> None:
    backend = RefusingBackend()
    transfer.backend = backend
    write_files(host_root)
    pick(config_dir, "/data")
    with pytest.raises(CommitRefused, match="refused the commit 3 times"):
        Archiver(make_config(), backend, transfer, ArchiveOptions(quiet=True, root_path=str(host_root))).run()  # type: ignore[arg-type]
    assert backend.counter.as_dict()["api"]["POST /manifests"] == 3


@dataclass
class CollectingBackend(FakeBackend):
    """Answers presign with 409 `collecting` (gc deleting an identical old pack) `refusals` times."""

    refusals: int = 1
    presign_calls: int = 0

    def presign_packs(self, packs: Sequence[Mapping[str, Any]]) -> tuple[list[dict], set[str]]:
        self.presign_calls += 1
        if self.refusals > 0:
            self.refusals -= 1
            answer = {"message": "being collected", "collecting": [packs[0]["sha256"]]}
            raise ApiError("POST /packs/presign", 409, answer["message"], answer)
        return super().presign_packs(packs)


def test_a_pack_gc_is_deleting_is_sent_again_after_a_wait(
    make_config, config_dir, host_root, transfer, monkeypatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(sink_module, "COLLECTING_WAITS_S", (7, 8))
    monkeypatch.setattr(sink_module.PackShipper, "sleep", staticmethod(waits.append))
    backend = CollectingBackend(refusals=1)
    transfer.backend = backend
    write_files(host_root)
    pick(config_dir, "/data")

    result = Archiver(
        make_config(), backend, transfer, ArchiveOptions(quiet=True, root_path=str(host_root))
    ).run()  # type: ignore[arg-type]

    assert backend.head == result.manifest_id and waits == [7]
    assert backend.presign_calls >= 2


def test_a_pack_still_being_deleted_after_the_waits_fails_the_run_clearly(
    make_config, config_dir, host_root, transfer, monkeypatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(sink_module, "COLLECTING_WAITS_S", (1, 2))
    monkeypatch.setattr(sink_module.PackShipper, "sleep", staticmethod(waits.append))
    backend = CollectingBackend(refusals=100)
    transfer.backend = backend
    write_files(host_root)
    pick(config_dir, "/data")

    with pytest.raises(ApiError) as refused:
        Archiver(make_config(), backend, transfer, ArchiveOptions(quiet=True, root_path=str(host_root))).run()  # type: ignore[arg-type]
    assert refused.value.status == 409 and waits == [1, 2]
    assert backend.head is None
