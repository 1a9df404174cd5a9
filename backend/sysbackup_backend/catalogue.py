"""The manifest catalogue (ManifestTable): one summary item per manifest and a HEAD item per host."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError
from sysbackup_domain.manifest import is_manifest_id

from .errors import BadRequest, Conflict

HEAD_ID = "HEAD"
# A summary's stats are capped: `GET /manifests` answers up to MAX_PAGE_LIMIT summaries through Lambda's
# 6 MB response, and a host may send up to 2 MiB of stats. The full stats stay in the manifest document.
SUMMARY_STATS_BYTES = 4096
SUMMARY_STRING_CHARS = 256
STATS_TRUNCATED_KEY = "truncated"
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000


def summary_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """`stats` itself when small; else its scalar top-level fields (short strings) within the cap.

    The uploader reads figures (`files`, `bytes`, ...) and `run_id` from a summary, all scalars.
    """
    if len(json.dumps(stats, sort_keys=True)) <= SUMMARY_STATS_BYTES:
        return stats
    kept: dict[str, Any] = {STATS_TRUNCATED_KEY: True}
    size = len(json.dumps(kept))
    for key in sorted(stats):
        value = stats[key]
        if isinstance(value, str) and len(value) > SUMMARY_STRING_CHARS:
            continue
        if value is not None and not isinstance(value, (str, int, float, bool)):
            continue
        field_size = len(json.dumps({key: value})) + 1
        if size + field_size > SUMMARY_STATS_BYTES:
            continue
        kept[key] = value
        size += field_size
    return kept


def page_token(host: str, manifest_id: str) -> str:
    """An opaque token for the page after `manifest_id`; it names the host it was issued for."""
    raw = json.dumps({"host": host, "after": manifest_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def token_after(token: str, host: str, valid: Callable[[str], bool]) -> str:
    """What a `page_token(host, ...)` token continues after, if `valid` takes it; else BadRequest."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        fields = json.loads(raw)
    except (binascii.Error, ValueError):
        raise BadRequest("malformed `next` token") from None
    if not isinstance(fields, dict) or set(fields) != {"host", "after"}:
        raise BadRequest("malformed `next` token")
    if fields["host"] != host:
        # Paging is within the partition of `host` anyway; a token from another listing is a client bug.
        raise BadRequest("the `next` token belongs to another host's listing")
    after = fields["after"]
    if not isinstance(after, str) or not valid(after):
        raise BadRequest("malformed `next` token")
    return after


def manifest_after(token: str, host: str) -> str:
    """The manifest id a token from `page_token(host, ...)` continues after; BadRequest otherwise."""
    return token_after(token, host, is_manifest_id)


@dataclass(frozen=True)
class SummaryPage:
    summaries: list[ManifestSummary]
    next_after: str | None  # the last summary's id when more may follow


@dataclass(frozen=True)
class ManifestSummary:
    host: str
    manifest_id: str
    created: str
    parent: str | None
    root: str | None
    retain_until: str
    stats: dict[str, Any]
    key: str  # the manifest document's S3 key

    def to_item(self) -> dict[str, Any]:
        # Stats are the host's free-form JSON (floats included), which DynamoDB numbers refuse: kept as text.
        return {
            "host": self.host,
            "manifest_id": self.manifest_id,
            "created": self.created,
            "parent": self.parent,
            "root": self.root,
            "retain_until": self.retain_until,
            "stats_json": json.dumps(summary_stats(self.stats), sort_keys=True),
            "key": self.key,
        }

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> ManifestSummary:
        return cls(
            host=item["host"],
            manifest_id=item["manifest_id"],
            created=item["created"],
            parent=item.get("parent"),
            root=item.get("root"),
            retain_until=item["retain_until"],
            stats=json.loads(item.get("stats_json") or "{}"),
            key=item["key"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest_id": self.manifest_id,
            "created": self.created,
            "parent": self.parent,
            "root": self.root,
            "retain_until": self.retain_until,
            "stats": summary_stats(self.stats),
        }


class TransactionRefused(Exception):
    """A commit transaction was cancelled; `reasons` are DynamoDB's codes, one per transact item."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(f"transaction cancelled: {reasons}")
        self.reasons = reasons


class Catalogue:
    def __init__(self, table_name: str, client: Any) -> None:
        self.table_name = table_name
        self.client = client

    def head(self, host: str) -> str | None:
        response = self.client.get_item(
            TableName=self.table_name, Key={"host": host, "manifest_id": HEAD_ID}, ConsistentRead=True
        )
        item = response.get("Item")
        return item.get("current") if item else None

    def get(self, host: str, manifest_id: str) -> ManifestSummary | None:
        if manifest_id == HEAD_ID:
            return None
        response = self.client.get_item(
            TableName=self.table_name, Key={"host": host, "manifest_id": manifest_id}
        )
        item = response.get("Item")
        return ManifestSummary.from_item(item) if item else None

    def list(self, host: str) -> list[ManifestSummary]:
        """The host's manifests, oldest first (ids sort by time)."""
        summaries: list[ManifestSummary] = []
        query: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": Key("host").eq(host),
        }
        while True:
            response = self.client.query(**query)
            summaries.extend(
                ManifestSummary.from_item(item)
                for item in response["Items"]
                if item["manifest_id"] != HEAD_ID
            )
            if "LastEvaluatedKey" not in response:
                return summaries
            query["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def page(self, host: str, limit: int, after: str | None = None) -> SummaryPage:
        """Up to `limit` of the host's manifests, newest first, older than `after` if given."""
        upper = after if after is not None else HEAD_ID  # ids are digits first, so all sort below HEAD
        summaries: list[ManifestSummary] = []
        query: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": Key("host").eq(host) & Key("manifest_id").lt(upper),
            "ScanIndexForward": False,
        }
        while len(summaries) < limit:
            # DynamoDB may stop a page early (1 MB read); keep reading until `limit` or the end.
            response = self.client.query(**query, Limit=limit - len(summaries))
            summaries.extend(ManifestSummary.from_item(item) for item in response["Items"])
            if "LastEvaluatedKey" not in response:
                return SummaryPage(summaries, None)
            query["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return SummaryPage(summaries, summaries[-1].manifest_id if summaries else None)

    def commit(
        self, summary: ManifestSummary, parent: str | None, extra_items: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Add the summary and move HEAD from `parent` in one transaction.

        Conflict if HEAD is not `parent` (or exists when parent is None); TransactionRefused if one of
        `extra_items` (condition checks on blobs, the job's update) failed.
        """
        if parent is None:
            head_condition: dict[str, Any] = {"ConditionExpression": "attribute_not_exists(#current)"}
        else:
            head_condition = {
                "ConditionExpression": "#current = :parent",
                "ExpressionAttributeValues": {":parent": parent, ":new": summary.manifest_id},
            }
        head_update = {
            "Update": {
                "TableName": self.table_name,
                "Key": {"host": summary.host, "manifest_id": HEAD_ID},
                "UpdateExpression": "SET #current = :new",
                "ExpressionAttributeNames": {"#current": "current"},
                "ExpressionAttributeValues": {":new": summary.manifest_id},
                **head_condition,
            }
        }
        put_summary = {
            "Put": {
                "TableName": self.table_name,
                "Item": summary.to_item(),
                "ConditionExpression": "attribute_not_exists(manifest_id)",
            }
        }
        try:
            self.client.transact_write_items(TransactItems=[head_update, put_summary, *extra_items])
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                raise
            reasons = [reason.get("Code", "None") for reason in error.response.get("CancellationReasons", [])]
            if reasons and reasons[0] == "ConditionalCheckFailed":
                raise Conflict(
                    f"parent {parent!r} is not the current head of host {summary.host!r}",
                    current=self.head(summary.host),
                ) from None
            raise TransactionRefused(reasons) from None
