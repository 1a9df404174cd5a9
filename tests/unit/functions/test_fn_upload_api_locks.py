"""Pack locks at presign, and presign racing gc's deletion of a pack, through the upload API handler."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.registry import PACK_DELETING, PACK_PRESIGNED, PACK_VERIFIED
from sysbackup_domain.retention import iso_utc, parse_iso_utc
from sysbackup_testkit import (
    BuiltPack,
    FakeLambdaContext,
    build_pack,
    http_event,
    load_function,
    put_pack_object,
    response_json,
    store_pack,
    user_arn,
)

DAYS_RETAINED = 30  # the testkit stack's default
FOLD_WINDOW = timedelta(days=7)  # FOLD_WINDOW_SECONDS unset: the settings' default
CONDEMNED_AT = datetime(2026, 11, 1, tzinfo=timezone.utc)


@pytest.fixture
def upload_api(backend: Services) -> Any:
    return load_function("upload_api")


def presign(module: Any, pack: BuiltPack, host: str = "alpha") -> tuple[int, Any]:
    body = {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]}
    response = module.lambda_handler(
        http_event("POST", "/packs/presign", body, caller_arn=user_arn(host)), FakeLambdaContext()
    )
    return response["statusCode"], response_json(response)


def signed_lock(upload: dict[str, Any]) -> datetime:
    headers = {name.lower(): value for name, value in upload["headers"].items()}
    return parse_iso_utc(headers["x-amz-object-lock-retain-until-date"].replace(".000", ""))


def test_presign_locks_a_fold_window_past_the_default_retention(upload_api: Any, backend: Services) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    pack = build_pack([("data", b"locked long enough " * 10)])
    status, body = presign(upload_api, pack)
    assert status == 200
    (upload,) = body["uploads"]
    lock = signed_lock(upload)
    assert before + timedelta(days=DAYS_RETAINED) + FOLD_WINDOW <= lock
    assert lock <= datetime.now(timezone.utc) + timedelta(days=DAYS_RETAINED, seconds=1) + FOLD_WINDOW
    recorded = backend.registry.get(pack.pack_id)
    assert recorded is not None and recorded.retain_until == iso_utc(lock)


def condemned(backend: Services, pack: BuiltPack) -> str:
    assert backend.registry.condemn(pack.pack_id, CONDEMNED_AT)
    return iso_utc(CONDEMNED_AT)


def test_a_presign_before_gc_starts_deleting_keeps_the_pack(upload_api: Any, backend: Services) -> None:
    """gc saw the pack condemned; a host presigns it (revives it) before gc moves it to deleting: gc's
    conditional move fails, so the pack and its object stay."""
    pack = store_pack(backend, "alpha", [("data", b"dead, then needed again " * 10)], state="verified")
    seen_condemned_at = condemned(backend, pack)
    assert presign(upload_api, pack, host="beta") == (200, {"uploads": [], "stored": [pack.pack_id]})
    assert not backend.registry.start_deleting(pack.pack_id, seen_condemned_at)
    kept = backend.registry.get(pack.pack_id)
    assert kept is not None and kept.state == PACK_VERIFIED and kept.usable_by("beta")
    assert backend.store.head_pack(pack.pack_id) is not None


def test_a_presign_after_gc_started_deleting_waits(upload_api: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"collected while a host sends it again " * 10)])
    assert backend.registry.start_deleting(pack.pack_id, condemned(backend, pack))
    status, body = presign(upload_api, pack)
    assert (status, body["collecting"]) == (409, [pack.pack_id])
    gone = backend.registry.get(pack.pack_id)
    assert gone is not None and gone.state == PACK_DELETING
    # gc finishes; the host's retry presigns the pack afresh and uploads it again.
    assert backend.registry.delete(pack.pack_id)
    status, body = presign(upload_api, pack)
    assert status == 200 and [upload["pack_id"] for upload in body["uploads"]] == [pack.pack_id]
    fresh = backend.registry.get(pack.pack_id)
    assert fresh is not None and fresh.state == PACK_PRESIGNED


def test_an_orphan_revived_by_presign_is_stored_once_its_object_is_there(
    upload_api: Any, backend: Services
) -> None:
    """A crashed run's pack (presigned, PUT, never committed) gc condemned as an orphan: the re-run's presign
    revives it and, the object being there, answers stored."""
    pack = build_pack([("data", b"orphan of a crashed run " * 10)])
    presign(upload_api, pack)
    put_pack_object(backend, pack)
    condemned(backend, pack)
    assert presign(upload_api, pack) == (200, {"uploads": [], "stored": [pack.pack_id]})
    revived = backend.registry.get(pack.pack_id)
    assert revived is not None and revived.state == PACK_PRESIGNED and revived.condemned_at is None
