"""A commit refused because gc condemned blobs the host's cache vouched for (issue 6): the run starts over
once without the cache and sends those blobs again, through a backend that models condemnation as the real
one does (docs/ARCHITECTURE.md): a condemned blob is never answered by the dedup check, its pack stays in
the bucket (a PUT of the same pack answers 412) and presign still calls that pack registered; a fresh claim
(register) stores the blob again for the host."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import pick
from s3_sysbackup import sink as sink_module
from s3_sysbackup.api import ApiError
from s3_sysbackup.archiver import ArchiveOptions, Archiver
from sysbackup_domain.manifest import parse_commit_request, referenced_blobs
from sysbackup_domain.packs import PackEntry
from uploader_fakes import FakeBackend


@dataclass
class CondemningBackend(FakeBackend):
    condemned: set[str] = field(default_factory=set)

    def condemn_everything(self) -> None:
        """What gc does to every blob once no live manifest reaches it (here: all of them)."""
        self.condemned = set(self.blobs)

    def check_blobs(self, hashes: Iterable[str]) -> set[str]:
        return super().check_blobs(hashes) - self.condemned

    def register_packs(self, packs: Sequence[Mapping[str, Any]]) -> list[str]:
        registered = super().register_packs(packs)
        for pack in packs:
            self.condemned -= {PackEntry.from_json(blob).hash for blob in pack["blobs"]}
        return registered

    def commit_manifest(self, body: Mapping[str, Any]) -> dict:
        condemned = sorted(set(referenced_blobs(parse_commit_request(dict(body)))) & self.condemned)
        if condemned:
            self._count("POST /manifests")
            answer = {"message": "the manifest references blobs that are not stored", "condemned": condemned}
            raise ApiError("POST /manifests", 422, answer["message"], answer)
        return super().commit_manifest(body)


def write_files(root: Path) -> Path:
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_bytes(b"first file\n" * 50)
    (data / "sub" / "b.txt").write_bytes(b"second file\n" * 70)
    return data


def test_blobs_condemned_under_the_cache_are_sent_again_on_the_retry(
    make_config, config_dir, host_root, transfer
) -> None:
    backend = CondemningBackend()
    transfer.backend = backend
    write_files(host_root)
    pick(config_dir, "/data")
    config = make_config(workers=1)  # one reader: the retry builds byte-identical packs (presign: registered)

    def run() -> Any:
        return Archiver(config, backend, transfer, ArchiveOptions(quiet=True, root_path=str(host_root))).run()  # type: ignore[arg-type]

    first = run()
    backend.condemn_everything()  # the run's manifest was forgotten by gc, and a grace period went by
    assert backend.condemned
    registers_before = backend.counter.as_dict().get("api", {}).get("POST /packs/register", 0)

    second = run()

    assert second.manifest_id != first.manifest_id and backend.head == second.manifest_id
    assert backend.condemned == set()  # every blob the manifest needs was claimed again
    assert backend.counter.as_dict()["api"]["POST /packs/register"] > registers_before


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
