"""Batched DynamoDB reads and writes with their unprocessed remainders retried."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from botocore.exceptions import ClientError

BATCH_GET_LIMIT = 100
BATCH_WRITE_LIMIT = 25
_MAX_ROUNDS = 10
# Batches sent at once: a commit walk or a check of 1000 hashes is 20+ BatchGetItems, and their
# round trips, not DynamoDB, are what the caller waits for (boto3 clients are thread-safe).
PARALLEL_BATCHES = 8

T = TypeVar("T")
R = TypeVar("R")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _backoff(round_number: int) -> None:
    time.sleep(min(0.05 * 2**round_number, 1.0))


def batch_get(
    client: Any, table: str, keys: Sequence[dict[str, Any]], consistent: bool = False
) -> list[dict[str, Any]]:
    """All items found for `keys` (missing keys are simply absent)."""

    def get_batch(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        request: dict[str, Any] = {table: {"Keys": list(batch), "ConsistentRead": consistent}}
        for round_number in range(_MAX_ROUNDS):
            response = client.batch_get_item(RequestItems=request)
            found.extend(response.get("Responses", {}).get(table, []))
            request = response.get("UnprocessedKeys") or {}
            if not request:
                return found
            _backoff(round_number)
        raise RuntimeError(f"DynamoDB kept throttling a BatchGetItem on {table}")

    return [item for found in _each_batch(get_batch, list(keys), BATCH_GET_LIMIT) for item in found]


def batch_put(client: Any, table: str, items: Iterable[dict[str, Any]]) -> None:
    def put_batch(batch: Sequence[dict[str, Any]]) -> None:
        pending: dict[str, Any] = {table: list(batch)}
        for round_number in range(_MAX_ROUNDS):
            response = client.batch_write_item(RequestItems=pending)
            pending = response.get("UnprocessedItems") or {}
            if not pending:
                return
            _backoff(round_number)
        raise RuntimeError(f"DynamoDB kept throttling a BatchWriteItem on {table}")

    _each_batch(put_batch, [{"PutRequest": {"Item": item}} for item in items], BATCH_WRITE_LIMIT)


def _each_batch(work: Callable[[Sequence[T]], R], items: Sequence[T], size: int) -> list[R]:
    """`work` on every batch of `size`, up to PARALLEL_BATCHES at once; the first failure is raised."""
    batches = list(chunks(items, size))
    if len(batches) <= 1:
        return [work(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=min(PARALLEL_BATCHES, len(batches))) as pool:
        return list(pool.map(work, batches))


def is_condition_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
