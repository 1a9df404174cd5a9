"""Batched DynamoDB reads and writes with their unprocessed remainders retried."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from botocore.exceptions import ClientError

BATCH_GET_LIMIT = 100
BATCH_WRITE_LIMIT = 25
_MAX_ROUNDS = 10

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _backoff(round_number: int) -> None:
    time.sleep(min(0.05 * 2**round_number, 1.0))


def batch_get(client: Any, table: str, keys: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """All items found for `keys` (missing keys are simply absent)."""
    found: list[dict[str, Any]] = []
    for batch in chunks(list(keys), BATCH_GET_LIMIT):
        request: dict[str, Any] = {table: {"Keys": list(batch)}}
        for round_number in range(_MAX_ROUNDS):
            response = client.batch_get_item(RequestItems=request)
            found.extend(response.get("Responses", {}).get(table, []))
            request = response.get("UnprocessedKeys") or {}
            if not request:
                break
            _backoff(round_number)
        else:
            raise RuntimeError(f"DynamoDB kept throttling a BatchGetItem on {table}")
    return found


def batch_put(client: Any, table: str, items: Iterable[dict[str, Any]]) -> None:
    requests = [{"PutRequest": {"Item": item}} for item in items]
    for batch in chunks(requests, BATCH_WRITE_LIMIT):
        pending: dict[str, Any] = {table: list(batch)}
        for round_number in range(_MAX_ROUNDS):
            response = client.batch_write_item(RequestItems=pending)
            pending = response.get("UnprocessedItems") or {}
            if not pending:
                break
            _backoff(round_number)
        else:
            raise RuntimeError(f"DynamoDB kept throttling a BatchWriteItem on {table}")


def is_condition_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
