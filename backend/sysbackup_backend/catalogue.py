"""The manifest catalogue (ManifestTable): one summary item per manifest and a HEAD item per host."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from .errors import Conflict

HEAD_ID = "HEAD"


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
            "stats_json": json.dumps(self.stats, sort_keys=True),
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
            "stats": self.stats,
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
