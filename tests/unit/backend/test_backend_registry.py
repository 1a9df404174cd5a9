"""The pack registry: one item per pack, its states and the conditions that keep gc and hosts apart."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.registry import (
    PACK_CONDEMNED,
    PACK_CORRUPT,
    PACK_DELETING,
    PACK_PRESIGNED,
    PACK_VERIFIED,
    PackRecord,
    PackRegistry,
    pack_key,
)
from sysbackup_testkit import TEST_RETAIN_UNTIL, store_pack

NOW = datetime(2026, 11, 22, 2, 0, tzinfo=timezone.utc)


def _presigned(registry: PackRegistry, pack_id: str, host: str = "alpha", size: int = 100) -> PackRecord:
    return registry.record_presigned(pack_id, host, size, TEST_RETAIN_UNTIL)


def _record(registry: PackRegistry, pack_id: str) -> PackRecord:
    record = registry.get(pack_id)
    assert record is not None, f"no item for {pack_id}"
    return record


def _condemned_at(registry: PackRegistry, pack_id: str) -> str:
    condemned_at = _record(registry, pack_id).condemned_at
    assert condemned_at is not None
    return condemned_at


def _pack_id(number: int) -> str:
    return f"{number:064x}"


def test_record_presigned_creates_the_item_once(backend: Services) -> None:
    registry = backend.registry
    first = _presigned(registry, _pack_id(1), "alpha", 100)
    again = registry.record_presigned(_pack_id(1), "beta", 999, "2031-01-01T00:00:00Z")
    assert first == again == registry.get(_pack_id(1))
    assert (first.host, first.hosts, first.size, first.state) == ("alpha", {"alpha"}, 100, PACK_PRESIGNED)
    assert first.retain_until == TEST_RETAIN_UNTIL


def test_get_of_an_unknown_pack_is_none(backend: Services) -> None:
    assert backend.registry.get(_pack_id(404)) is None


def test_add_host_makes_the_pack_usable_by_that_host(backend: Services) -> None:
    registry = backend.registry
    record = _presigned(registry, _pack_id(2))
    assert not record.usable_by("beta")
    assert registry.add_host(_pack_id(2), "beta")
    updated = registry.get(_pack_id(2))
    assert updated is not None and updated.hosts == {"alpha", "beta"} and updated.usable_by("beta")
    assert updated.host == "alpha"  # the ByHost key stays the first presigner


def test_add_host_refused_for_unknown_and_deleting_packs(backend: Services) -> None:
    registry = backend.registry
    assert not registry.add_host(_pack_id(3), "beta")
    assert registry.get(_pack_id(3)) is None  # no half item created
    _presigned(registry, _pack_id(4))
    assert registry.condemn(_pack_id(4), NOW)
    condemned = registry.get(_pack_id(4))
    assert condemned is not None and condemned.condemned_at is not None
    assert registry.start_deleting(_pack_id(4), condemned.condemned_at)
    assert not registry.add_host(_pack_id(4), "beta")


def test_get_many_reads_more_than_one_batch_and_skips_unknown_packs(backend: Services) -> None:
    registry = backend.registry
    known = [_pack_id(number) for number in range(130)]
    for pack_id in known:
        _presigned(registry, pack_id)
    records = registry.get_many([*known, _pack_id(9999), known[0]])
    assert sorted(records) == sorted(known)
    assert all(records[pack_id].pack_id == pack_id for pack_id in known)


def test_mark_verified_from_presigned_records_blob_count(backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"one"), ("data", b"two")])
    assert backend.registry.mark_verified(pack.pack_id, len(pack.entries))
    record = backend.registry.get(pack.pack_id)
    assert record is not None
    assert (record.state, record.blob_count) == (PACK_VERIFIED, 2)
    assert record.verified_at is not None and record.usable_by("alpha")


def test_mark_verified_does_not_resurrect_corrupt_or_condemned_packs(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(5))
    assert registry.mark_corrupt(_pack_id(5), "blob 0 does not hash to its name")
    assert not registry.mark_verified(_pack_id(5), 1)
    _presigned(registry, _pack_id(6))
    assert registry.condemn(_pack_id(6), NOW)
    assert not registry.mark_verified(_pack_id(6), 1)
    states = {
        pack_id: record.state for pack_id, record in registry.get_many([_pack_id(5), _pack_id(6)]).items()
    }
    assert states == {_pack_id(5): PACK_CORRUPT, _pack_id(6): PACK_CONDEMNED}
    assert not registry.mark_verified(_pack_id(7), 1)  # no item: nothing created


def test_mark_corrupt_keeps_the_reason_and_spares_deleting_packs(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(8))
    assert registry.mark_corrupt(_pack_id(8), "x" * 5000)
    record = registry.get(_pack_id(8))
    assert record is not None and record.state == PACK_CORRUPT and not record.usable_by("alpha")
    assert record.corrupt_reason == "x" * 1000 and record.corrupt_at is not None
    _presigned(registry, _pack_id(9))
    registry.condemn(_pack_id(9), NOW)
    condemned_at = _condemned_at(registry, _pack_id(9))
    assert registry.start_deleting(_pack_id(9), condemned_at)
    assert not registry.mark_corrupt(_pack_id(9), "bad")
    assert _record(registry, _pack_id(9)).state == PACK_DELETING


def test_verified_update_is_a_transaction_element_with_the_same_condition(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(10))
    _presigned(registry, _pack_id(11))
    registry.mark_corrupt(_pack_id(11), "bad")
    registry.client.transact_write_items(TransactItems=[registry.verified_update(_pack_id(10), 3)])
    record = registry.get(_pack_id(10))
    assert record is not None and (record.state, record.blob_count) == (PACK_VERIFIED, 3)
    with pytest.raises(registry.client.exceptions.TransactionCanceledException):
        registry.client.transact_write_items(TransactItems=[registry.verified_update(_pack_id(11), 3)])
    assert _record(registry, _pack_id(11)).state == PACK_CORRUPT


def test_list_host_pages_through_the_hosts_packs_only(backend: Services) -> None:
    registry = backend.registry
    alphas = sorted(_pack_id(number) for number in range(20, 27))
    for pack_id in alphas:
        _presigned(registry, pack_id, "alpha", size=int(pack_id, 16))
    _presigned(registry, _pack_id(30), "beta")
    seen: list[PackRecord] = []
    after: str | None = None
    for _ in range(10):
        page, after = registry.list_host("alpha", 3, after)
        assert len(page) <= 3
        seen.extend(page)
        if after is None:
            break
    assert [record.pack_id for record in seen] == alphas
    assert all(record.size == int(record.pack_id, 16) and record.state == PACK_PRESIGNED for record in seen)
    assert registry.list_host("gamma", 10) == ([], None)


def test_condemn_and_revive_restore_the_previous_state(backend: Services) -> None:
    registry = backend.registry
    pack = store_pack(backend, "alpha", [("data", b"kept")], state="verified")
    assert registry.condemn(pack.pack_id, NOW, superseded_by=_pack_id(12))
    condemned = registry.get(pack.pack_id)
    assert condemned is not None
    assert (condemned.state, condemned.state_before_condemned) == (PACK_CONDEMNED, PACK_VERIFIED)
    assert condemned.condemned_at == "2026-11-22T02:00:00Z"
    assert condemned.superseded_by == _pack_id(12) and not condemned.usable_by("alpha")
    assert not registry.condemn(pack.pack_id, NOW)  # already condemned
    assert registry.revive(pack.pack_id)
    revived = registry.get(pack.pack_id)
    assert revived is not None and revived.state == PACK_VERIFIED and revived.usable_by("alpha")
    assert (revived.condemned_at, revived.state_before_condemned, revived.superseded_by) == (None, None, None)
    assert not registry.revive(pack.pack_id)  # not condemned any more


def test_start_deleting_loses_to_a_revive_and_a_later_condemn(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(13))
    registry.condemn(_pack_id(13), NOW)
    seen_at = _condemned_at(registry, _pack_id(13))
    registry.revive(_pack_id(13))  # a host presigned it again in between
    assert not registry.start_deleting(_pack_id(13), seen_at)
    registry.condemn(_pack_id(13), NOW.replace(hour=3))
    assert not registry.start_deleting(_pack_id(13), seen_at)
    assert _record(registry, _pack_id(13)).state == PACK_CONDEMNED


def test_delete_only_drops_a_pack_being_deleted(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(14))
    assert not registry.delete(_pack_id(14))
    registry.condemn(_pack_id(14), NOW)
    assert not registry.delete(_pack_id(14))
    registry.start_deleting(_pack_id(14), _condemned_at(registry, _pack_id(14)))
    assert registry.delete(_pack_id(14))
    assert registry.get(_pack_id(14)) is None


def test_record_repacked_is_verified_for_every_host_and_keeps_an_existing_item(backend: Services) -> None:
    registry = backend.registry
    record = registry.record_repacked(_pack_id(15), {"beta", "alpha"}, 500, 7, TEST_RETAIN_UNTIL)
    assert record == registry.get(_pack_id(15))
    assert (record.state, record.blob_count, record.size, record.hosts) == (
        PACK_VERIFIED,
        7,
        500,
        {"alpha", "beta"},
    )
    assert record.host in record.hosts
    _presigned(registry, _pack_id(16), "gamma")
    existing = registry.record_repacked(_pack_id(16), {"alpha"}, 500, 7, TEST_RETAIN_UNTIL)
    assert (existing.host, existing.state) == ("gamma", PACK_PRESIGNED)


def test_raise_retain_until_only_grows(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(17))
    assert registry.raise_retain_until(_pack_id(17), "2031-06-01T00:00:00Z")
    assert not registry.raise_retain_until(_pack_id(17), "2030-06-01T00:00:00Z")
    assert _record(registry, _pack_id(17)).retain_until == "2031-06-01T00:00:00Z"
    assert not registry.raise_retain_until(_pack_id(18), "2031-06-01T00:00:00Z")
    assert registry.get(_pack_id(18)) is None


def test_scan_yields_every_pack_and_nothing_else(backend: Services) -> None:
    registry = backend.registry
    wanted = {_pack_id(number) for number in range(40, 45)}
    for pack_id in wanted:
        _presigned(registry, pack_id)
    registry.client.put_item(
        TableName=registry.table_name, Item={"pk": "gc#epoch", "sk": "epoch", "number": 2}
    )
    assert {record.pack_id for record in registry.scan()} == wanted


def test_pack_key_matches_the_stored_item(backend: Services) -> None:
    _presigned(backend.registry, _pack_id(19))
    item = backend.registry.client.get_item(TableName=backend.registry.table_name, Key=pack_key(_pack_id(19)))
    assert item["Item"]["pk"] == f"pack#{_pack_id(19)}"


# --- membership items: every pack a host may use is listed under it ------------------------------------


def _listed(registry: PackRegistry, host: str, page_size: int = 1000) -> list[str]:
    listed: list[str] = []
    after: str | None = None
    for _ in range(100):
        page, after = registry.list_host(host, page_size, after)
        listed.extend(record.pack_id for record in page)
        if after is None:
            return listed
    raise AssertionError("list_host never ended")


def test_a_host_added_to_a_pack_lists_it_with_its_own(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(50), "alpha")
    _presigned(registry, _pack_id(51), "beta")
    _presigned(registry, _pack_id(52), "beta")
    assert registry.add_host(_pack_id(50), "beta")
    assert _listed(registry, "beta") == [_pack_id(50), _pack_id(51), _pack_id(52)]
    assert _listed(registry, "beta", page_size=1) == [_pack_id(50), _pack_id(51), _pack_id(52)]
    shared = registry.list_host("beta", 1)[0][0]
    assert shared == _record(registry, _pack_id(50))  # the whole record, from the pack item
    assert _listed(registry, "alpha") == [_pack_id(50)]


def test_adding_the_first_host_or_a_member_again_writes_no_second_listing(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(53), "alpha")
    assert registry.add_host(_pack_id(53), "alpha")
    assert registry.add_host(_pack_id(53), "beta")
    assert registry.add_host(_pack_id(53), "beta")
    assert _listed(registry, "alpha") == [_pack_id(53)]
    assert _listed(registry, "beta") == [_pack_id(53)]
    assert _record(registry, _pack_id(53)).hosts == {"alpha", "beta"}


def test_a_repacked_pack_is_listed_under_each_of_its_hosts(backend: Services) -> None:
    registry = backend.registry
    record = registry.record_repacked(_pack_id(54), {"gamma", "alpha", "beta"}, 500, 2, TEST_RETAIN_UNTIL)
    assert record.host == "alpha"
    for host in ("alpha", "beta", "gamma"):
        assert _listed(registry, host) == [_pack_id(54)]
    assert _listed(registry, "delta") == []


def test_delete_drops_the_memberships_and_scan_never_sees_them(backend: Services) -> None:
    registry = backend.registry
    registry.record_repacked(_pack_id(55), {"alpha", "beta"}, 500, 2, TEST_RETAIN_UNTIL)
    _presigned(registry, _pack_id(56), "gamma")
    registry.add_host(_pack_id(56), "beta")
    assert sorted(record.pack_id for record in registry.scan()) == [_pack_id(55), _pack_id(56)]
    registry.condemn(_pack_id(55), NOW)
    assert registry.start_deleting(_pack_id(55), _condemned_at(registry, _pack_id(55)))
    assert registry.delete(_pack_id(55))
    assert _listed(registry, "beta") == [_pack_id(56)]
    remaining = registry.client.scan(TableName=registry.table_name)["Items"]
    assert {item["pk"] for item in remaining} == {f"pack#{_pack_id(56)}"}


def test_a_membership_whose_pack_item_is_gone_is_not_listed(backend: Services) -> None:
    registry = backend.registry
    _presigned(registry, _pack_id(57), "alpha")
    registry.add_host(_pack_id(57), "beta")
    registry.client.delete_item(TableName=registry.table_name, Key=pack_key(_pack_id(57)))
    assert registry.list_host("beta", 10) == ([], None)
