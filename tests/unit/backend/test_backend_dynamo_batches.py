"""Batched DynamoDB reads and writes: every key and item goes through once, even when sent in parallel
and when DynamoDB hands back unprocessed remainders."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sysbackup_backend import dynamo
from sysbackup_backend.dynamo import BATCH_GET_LIMIT, BATCH_WRITE_LIMIT, batch_get, batch_put

TABLE = "index"


class ThrottlingTable:
    """A fake client: holds items by key, serves at most `serve` keys per call, tracks concurrency."""

    def __init__(self, serve: int) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.serve = serve
        self.calls = 0
        self.in_call = 0
        self.most_at_once = 0
        self._lock = threading.Lock()
        self._overlap = threading.Barrier(2, timeout=0.2)
        self.consistent_reads: set[bool] = set()

    def _enter(self) -> None:
        with self._lock:
            self.calls += 1
            self.in_call += 1
            self.most_at_once = max(self.most_at_once, self.in_call)
        try:
            self._overlap.wait()  # give a parallel caller the chance to be seen at once
        except threading.BrokenBarrierError:
            self._overlap.reset()

    def _leave(self) -> None:
        with self._lock:
            self.in_call -= 1

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        self._enter()
        try:
            keys = RequestItems[TABLE]["Keys"]
            consistent = RequestItems[TABLE]["ConsistentRead"]
            self.consistent_reads.add(consistent)
            assert len(keys) <= BATCH_GET_LIMIT
            served, rest = keys[: self.serve], keys[self.serve :]
            found = [self.items[k["pk"]] for k in served if k["pk"] in self.items]
            # DynamoDB hands the remainder back with the request's ConsistentRead.
            unprocessed = {TABLE: {"Keys": rest, "ConsistentRead": consistent}} if rest else {}
            return {"Responses": {TABLE: found}, "UnprocessedKeys": unprocessed}
        finally:
            self._leave()

    def batch_write_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        self._enter()
        try:
            requests = RequestItems[TABLE]
            assert len(requests) <= BATCH_WRITE_LIMIT
            served, rest = requests[: self.serve], requests[self.serve :]
            for request in served:
                item = request["PutRequest"]["Item"]
                with self._lock:
                    assert item["pk"] not in self.items, "an item was written twice"
                    self.items[item["pk"]] = item
            return {"UnprocessedItems": {TABLE: rest} if rest else {}}
        finally:
            self._leave()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dynamo, "_backoff", lambda round_number: None)


def test_batch_put_then_get_round_trip_every_item_once_in_parallel_batches() -> None:
    table = ThrottlingTable(serve=10)  # every batch comes back partly unprocessed
    items = [{"pk": f"blob#{n}", "value": n} for n in range(1234)]
    batch_put(table, TABLE, items)
    assert sorted(table.items) == sorted(item["pk"] for item in items)
    wanted = [{"pk": f"blob#{n}"} for n in range(0, 2000, 3)]  # some present, some never written
    found = batch_get(table, TABLE, wanted)
    assert sorted(item["value"] for item in found) == list(range(0, 1234, 3))
    assert table.most_at_once > 1  # batches overlapped
    assert table.most_at_once <= dynamo.PARALLEL_BATCHES


def test_a_single_batch_stays_on_the_calling_thread() -> None:
    table = ThrottlingTable(serve=BATCH_GET_LIMIT)
    table.items = {"blob#1": {"pk": "blob#1"}}
    calling_thread = threading.get_ident()
    seen: list[int] = []
    original = table.batch_get_item

    def spy(RequestItems: dict[str, Any]) -> dict[str, Any]:
        seen.append(threading.get_ident())
        return original(RequestItems)

    table.batch_get_item = spy  # type: ignore[method-assign]
    assert batch_get(table, TABLE, [{"pk": "blob#1"}, {"pk": "blob#2"}]) == [{"pk": "blob#1"}]
    assert seen == [calling_thread]


def test_endless_throttling_is_an_error_not_a_hang() -> None:
    table = ThrottlingTable(serve=0)
    with pytest.raises(RuntimeError, match="kept throttling a BatchWriteItem"):
        batch_put(table, TABLE, [{"pk": f"blob#{n}"} for n in range(60)])
    with pytest.raises(RuntimeError, match="kept throttling a BatchGetItem"):
        batch_get(table, TABLE, [{"pk": f"blob#{n}"} for n in range(250)])


@pytest.mark.parametrize("consistent", [True, False])
def test_batch_get_asks_for_the_read_consistency_in_every_round(consistent: bool) -> None:
    table = ThrottlingTable(serve=7)
    table.items = {f"pack#{n}": {"pk": f"pack#{n}"} for n in range(30)}
    found = batch_get(table, TABLE, [{"pk": f"pack#{n}"} for n in range(30)], consistent=consistent)
    assert len(found) == 30
    assert table.consistent_reads == {consistent}
