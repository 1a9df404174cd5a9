"""Dedup semantics of the blob index: what counts as stored, for whom."""

from __future__ import annotations

from sysbackup_backend.api import Services
from sysbackup_backend.index import blob_pk, host_sk
from sysbackup_domain.hashing import blob_hash
from sysbackup_testkit import build_pack, put_pack_object, store_claimed, store_verified


def _condemn(services: Services, blob: str, sort_key: str) -> None:
    services.index.client.update_item(
        TableName=services.index.table_name,
        Key={"pk": blob_pk(blob), "sk": sort_key},
        UpdateExpression="SET condemned_at = :now",
        ExpressionAttributeValues={":now": "2026-11-21T00:00:00Z"},
    )


def test_own_claim_counts_as_stored(backend: Services) -> None:
    store_claimed(backend, "alpha", [("data", b"alpha's file")])
    assert backend.index.stored_for("alpha", [blob_hash(b"alpha's file")]) == {blob_hash(b"alpha's file")}


def test_another_hosts_unverified_claim_does_not_count(backend: Services) -> None:
    store_claimed(backend, "alpha", [("data", b"claimed by alpha")])
    assert backend.index.stored_for("beta", [blob_hash(b"claimed by alpha")]) == set()


def test_verified_blob_counts_for_every_host(backend: Services) -> None:
    store_verified(backend, [("data", b"verified content")])
    assert backend.index.stored_for("beta", [blob_hash(b"verified content")]) == {
        blob_hash(b"verified content")
    }


def test_condemned_blob_is_never_stored(backend: Services) -> None:
    store_verified(backend, [("data", b"old content")])
    store_claimed(backend, "alpha", [("data", b"old content")])
    blob = blob_hash(b"old content")
    _condemn(backend, blob, "verified")
    _condemn(backend, blob, host_sk("alpha"))
    assert backend.index.stored_for("alpha", [blob]) == set()
    assert backend.index.stored_for("beta", [blob]) == set()
    assert backend.index.lookup("alpha", [blob])[blob].condemned


def test_a_host_sending_a_condemned_blob_again_has_it_stored_before_the_verifier_runs(
    backend: Services,
) -> None:
    """The verified item stays condemned until the verifier re-reads a pack holding the blob; the host's
    fresh claim (a new pack, registered) stores it for that host meanwhile, so its commit goes through."""
    store_verified(backend, [("data", b"collected, then needed again")])
    blob = blob_hash(b"collected, then needed again")
    _condemn(backend, blob, "verified")
    again = store_claimed(backend, "alpha", [("data", b"collected, then needed again"), ("data", b"other")])
    assert backend.index.stored_for("alpha", [blob]) == {blob}
    assert backend.index.locate("alpha", [blob])[blob].pack_id == again.pack_id
    assert backend.index.stored_for("beta", [blob]) == set()  # others wait for the verifier


def test_unknown_hashes_are_not_stored(backend: Services) -> None:
    known = store_verified(backend, [("data", b"known")])
    unknown = blob_hash(b"never uploaded")
    assert backend.index.stored_for("alpha", [unknown, known.entries[0].hash]) == {known.entries[0].hash}


def test_locate_prefers_verified_location_over_own_claim(backend: Services) -> None:
    claimed = store_claimed(backend, "alpha", [("data", b"shared"), ("data", b"padding")])
    verified = store_verified(backend, [("data", b"shared")])
    blob = blob_hash(b"shared")
    location = backend.index.locate("alpha", [blob])[blob]
    assert location.pack_id == verified.pack_id != claimed.pack_id
    assert location.verified


def test_lookup_handles_more_hashes_than_one_batch(backend: Services) -> None:
    contents = [f"blob {number}".encode() for number in range(130)]
    store_claimed(backend, "alpha", [("data", content) for content in contents])
    hashes = [blob_hash(content) for content in contents]
    assert backend.index.stored_for("alpha", [*hashes, blob_hash(b"absent")]) == set(hashes)


def test_record_verified_keeps_first_verified_location(backend: Services) -> None:
    first = store_verified(backend, [("data", b"twice")])
    second = build_pack([("data", b"twice"), ("data", b"other")])
    put_pack_object(backend, second)
    fresh = backend.index.record_verified(second.pack_id, second.entries)
    assert fresh == 1  # only "other" is new
    blob = blob_hash(b"twice")
    assert backend.index.locate("zeta", [blob])[blob].pack_id == first.pack_id
    assert backend.index.get_pack(second.pack_id)["state"] == "verified"


def test_register_does_not_demote_a_verified_pack(backend: Services) -> None:
    pack = store_verified(backend, [("data", b"verified first")])
    backend.index.record_presigned(pack.pack_id, "alpha", len(pack.data), "2030-01-01T00:00:00Z")
    backend.index.register_pack("alpha", pack.pack_id, pack.entries)
    item = backend.index.get_pack(pack.pack_id)
    assert item["state"] == "verified"
    assert item["hosts"] == {"alpha"}
    claim = backend.index.client.get_item(
        TableName=backend.index.table_name, Key={"pk": blob_pk(pack.entries[0].hash), "sk": host_sk("alpha")}
    )
    assert claim["Item"]["pack_id"] == pack.pack_id


def test_claim_on_a_pack_found_corrupt_is_not_stored(backend: Services) -> None:
    pack = store_claimed(backend, "alpha", [("data", b"in a bad pack")])
    backend.index.record_corrupt(pack.pack_id, "blob 0 does not hash to its name")
    blob = blob_hash(b"in a bad pack")
    assert backend.index.stored_for("alpha", [blob]) == set()
    assert backend.index.lookup("alpha", [blob])[blob].in_corrupt_pack
