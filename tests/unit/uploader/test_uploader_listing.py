"""Manifest order comes from parent links: ids only order commits to the second."""

from __future__ import annotations

from s3_sysbackup.listing import format_table, in_history_order, newest


def summary(manifest_id: str, parent: str | None, **stats: int) -> dict:
    return {"manifest_id": manifest_id, "parent": parent, "created": manifest_id[:16], "stats": stats}


def test_commits_in_one_second_are_ordered_by_their_parents():
    first = summary("20260101T000000Z-ffffffff", None)
    second = summary("20260101T000001Z-eeeeeeee", first["manifest_id"])
    third = summary("20260101T000001Z-00000000", second["manifest_id"])  # same second, smaller suffix
    ordered = in_history_order([third, first, second])
    assert [m["manifest_id"] for m in ordered] == [
        first["manifest_id"],
        second["manifest_id"],
        third["manifest_id"],
    ]
    assert newest([second, third, first]) is third


def test_manifests_whose_parent_was_collected_come_first_by_id():
    orphan = summary("20260101T000000Z-00000001", "20251201T000000Z-00000000")
    root = summary("20260102T000000Z-00000001", "20251231T000000Z-00000000")
    child = summary("20260103T000000Z-00000001", root["manifest_id"])
    assert [m["manifest_id"] for m in in_history_order([child, orphan, root])][-2:] == [
        root["manifest_id"],
        child["manifest_id"],
    ]
    assert newest([]) is None


def test_table_shows_the_figures():
    table = format_table([summary("20260101T000000Z-00000001", None, files=12, bytes=3456, snapshots=1)])
    header, row = table.splitlines()
    assert header.split() == ["created", "manifest_id", "files", "bytes", "snapshots", "warnings"]
    assert row.split() == ["20260101T000000Z", "20260101T000000Z-00000001", "12", "3456", "1"]
