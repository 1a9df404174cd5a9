"""Pack locks from presign to commit, and packs gc is deleting (issue 6), through the upload API handler."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.commit import Committer
from sysbackup_backend.index import PACK_DELETING, PACK_SK, pack_pk
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.retention import RetentionPolicy, iso_utc, parse_iso_utc
from sysbackup_testkit import (
    FakeLambdaContext,
    build_pack,
    file_entry,
    http_event,
    load_function,
    put_pack_object,
    response_json,
    tree_bytes,
    user_arn,
)
from test_gc import GRACE, REAL_NOW, collector
from test_gc_register_race import condemned_orphan, inject_before

DAYS_RETAINED = 30  # the testkit stack's default
FOLD_WINDOW = timedelta(days=7)  # FOLD_WINDOW_SECONDS unset: the settings' default


@dataclass
class Recorder:
    """Stands in for RetentionQueue: keeps what the commit asked for."""

    requests: list[tuple[list[str], datetime, str]] = field(default_factory=list)

    def request(self, pack_ids: list[str], retain_until: datetime, source: str) -> int:
        self.requests.append((sorted(pack_ids), retain_until, source))
        return 1


@pytest.fixture
def upload_api(backend: Services) -> Any:
    return load_function("upload_api")


def call(module: Any, path: str, body: Any, host: str = "alpha") -> tuple[int, Any]:
    response = module.lambda_handler(
        http_event("POST", path, body, caller_arn=user_arn(host)), FakeLambdaContext()
    )
    return response["statusCode"], response_json(response)


def ship(upload_api: Any, backend: Services, blobs: list[tuple[str, bytes]]) -> dict[str, Any]:
    """What the uploader does for one pack: presign, PUT, register; returns the presigned upload."""
    pack = build_pack(blobs)
    status, body = call(
        upload_api, "/packs/presign", {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]}
    )
    assert status == 200, body
    put_pack_object(backend, pack)
    register = {"packs": [{"pack_id": pack.pack_id, "blobs": [entry.to_json() for entry in pack.entries]}]}
    assert call(upload_api, "/packs/register", register) == (200, {"registered": [pack.pack_id]})
    (upload,) = body["uploads"]
    return dict(upload)


def fresh_run(upload_api: Any, backend: Services, days_retained: int | None) -> tuple[Recorder, list[str]]:
    """A first backup of one file through the API, committed with a recording extension queue."""
    content = b"a file of a fresh run " * 30
    root = tree_bytes([file_entry("f", [blob_hash(content)])])
    uploads = [ship(upload_api, backend, [("data", content)]), ship(upload_api, backend, [("tree", root)])]
    recorder = Recorder()
    policy = RetentionPolicy(days_retained=DAYS_RETAINED, max_days_retained=3650, lock_mode="GOVERNANCE")
    committer = Committer(
        backend.index, backend.store, backend.catalogue, backend.jobs, policy, retention_queue=recorder
    )  # type: ignore[arg-type]
    body = {
        "parent": None,
        "root": blob_hash(root),
        "snapshots": [],
        "stats": {},
        "days_retained": days_retained,
    }
    assert committer.start("alpha", body, Budget(60)).status_code == 201
    return recorder, [upload["pack_id"] for upload in uploads]


def test_presign_locks_a_fold_window_past_the_default_retention(upload_api: Any, backend: Services) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    upload = ship(upload_api, backend, [("data", b"locked long enough " * 10)])
    headers = {name.lower(): value for name, value in upload["headers"].items()}
    signed_lock = parse_iso_utc(headers["x-amz-object-lock-retain-until-date"].replace(".000", ""))
    assert signed_lock >= before + timedelta(days=DAYS_RETAINED) + FOLD_WINDOW
    assert backend.index.get_pack(upload["pack_id"])["retain_until"] == iso_utc(signed_lock)  # type: ignore[index]


def test_a_fresh_runs_packs_need_no_lock_extension(upload_api: Any, backend: Services) -> None:
    recorder, _ = fresh_run(upload_api, backend, days_retained=None)
    assert recorder.requests == []


def test_a_manifest_kept_longer_than_the_presigned_lock_still_asks_for_one(
    upload_api: Any, backend: Services
) -> None:
    recorder, packs = fresh_run(upload_api, backend, days_retained=DAYS_RETAINED + 8)
    ((requested, _, _),) = recorder.requests
    assert requested == sorted(packs)


def mark_deleting(backend: Services, pack_id: str) -> None:
    """What gc does right before it deletes a dead pack's versions."""
    backend.index.client.update_item(
        TableName=backend.index.table_name,
        Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
        UpdateExpression="SET #state = :deleting",
        ExpressionAttributeNames={"#state": "state"},
        ExpressionAttributeValues={":deleting": PACK_DELETING},
    )


def test_presign_and_register_refuse_a_pack_gc_is_deleting(upload_api: Any, backend: Services) -> None:
    pack = build_pack([("data", b"collected while a host sends it again " * 10)])
    presign = {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]}
    assert call(upload_api, "/packs/presign", presign)[0] == 200
    put_pack_object(backend, pack)
    mark_deleting(backend, pack.pack_id)

    status, body = call(upload_api, "/packs/presign", presign, host="beta")
    assert (status, body["collecting"]) == (409, [pack.pack_id])
    register = {"packs": [{"pack_id": pack.pack_id, "blobs": [entry.to_json() for entry in pack.entries]}]}
    status, body = call(upload_api, "/packs/register", register)
    assert (status, body["collecting"]) == (409, [pack.pack_id])
    status, body = call(upload_api, "/packs/adopt", {"packs": [pack.pack_id]})
    assert status == 200 and pack.pack_id in body["skipped"]
    blob = blob_hash(b"collected while a host sends it again " * 10)
    assert call(upload_api, "/blobs/check", {"hashes": [blob]})[1]["stored"] == []


def test_a_presign_after_gcs_scan_keeps_the_pack_it_presigned(
    upload_api: Any, backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host presigns an old dead pack (byte-identical to its own) just before gc would delete it: its PUT
    answers 412 and it registers next, so gc must keep the pack."""
    orphan, _ = condemned_orphan(backend)
    gc = collector(backend, REAL_NOW + 4 * GRACE)
    size = backend.index.get_pack(orphan)["size"]  # type: ignore[index]
    answers: list[int] = []
    inject_before(
        monkeypatch,
        gc,
        "_delete_dead_packs",
        lambda: answers.append(
            call(upload_api, "/packs/presign", {"packs": [{"sha256": orphan, "size": int(size)}]}, "beta")[0]
        ),
    )
    report = gc.run()
    assert answers == [200]
    assert report.packs_deleted == 0 and backend.store.head_pack(orphan) is not None
