"""The pack registry (BlobIndexTable): one item per pack, as in docs/PACK_INDEX.md.

Besides the pack item, a pack has a membership item per host of `hosts` other than its first `host`, so
that the ByHost index lists, under each host, every pack the host may use. No other module writes them.

Timestamps are stored as ISO-8601 UTC strings (`iso_utc`), which compare in time order; methods take a
stored value (`retain_until`, `condemned_at`) as the string the record holds, and "now" as a datetime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import ClientError
from sysbackup_domain.retention import iso_utc

from .dynamo import batch_get, is_condition_failure

PACK_SK = "pack"
MEMBER_SK_PREFIX = "host#"
# A TransactWriteItems holds 100 items: a pack item and up to this many membership items.
MEMBERS_PER_TRANSACTION = 99
BY_HOST_INDEX = "ByHost"

PACK_PRESIGNED = "presigned"
PACK_VERIFIED = "verified"
PACK_CORRUPT = "corrupt"
PACK_CONDEMNED = "condemned"
PACK_DELETING = "deleting"
USABLE_STATES = frozenset({PACK_PRESIGNED, PACK_VERIFIED})

MAX_REASON_CHARS = 1000
_STATE = {"#state": "state"}


def pack_pk(pack_id: str) -> str:
    return f"pack#{pack_id}"


def pack_key(pack_id: str) -> dict[str, str]:
    return {"pk": pack_pk(pack_id), "sk": PACK_SK}


def membership_key(pack_id: str, host: str) -> dict[str, str]:
    return {"pk": pack_pk(pack_id), "sk": f"{MEMBER_SK_PREFIX}{host}"}


def membership_item(pack_id: str, host: str) -> dict[str, str]:
    """What puts the pack under `host` in the ByHost index."""
    return {**membership_key(pack_id, host), "host": host}


def _pack_id_of(item: dict[str, Any]) -> str:
    return str(item["pk"]).removeprefix("pack#")


def _now_iso() -> str:
    return iso_utc(datetime.now(timezone.utc))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class PackRecord:
    """One pack item's fields."""

    pack_id: str
    host: str  # the first host that presigned it (the ByHost partition)
    hosts: frozenset[str]  # every host allowed to use it
    size: int
    state: str
    created_at: str
    retain_until: str
    blob_count: int | None = None
    verified_at: str | None = None
    corrupt_reason: str | None = None
    corrupt_at: str | None = None
    condemned_at: str | None = None
    state_before_condemned: str | None = None
    superseded_by: str | None = None
    deleting_at: str | None = None

    def usable_by(self, host: str) -> bool:
        return host in self.hosts and self.state in USABLE_STATES

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> PackRecord:
        return cls(
            pack_id=_pack_id_of(item),
            host=str(item["host"]),
            hosts=frozenset(str(host) for host in item.get("hosts", ())),
            size=int(item["size"]),
            state=str(item["state"]),
            created_at=str(item["created_at"]),
            retain_until=str(item["retain_until"]),
            blob_count=_optional_int(item.get("blob_count")),
            verified_at=_optional_str(item.get("verified_at")),
            corrupt_reason=_optional_str(item.get("corrupt_reason")),
            corrupt_at=_optional_str(item.get("corrupt_at")),
            condemned_at=_optional_str(item.get("condemned_at")),
            state_before_condemned=_optional_str(item.get("state_before_condemned")),
            superseded_by=_optional_str(item.get("superseded_by")),
            deleting_at=_optional_str(item.get("deleting_at")),
        )


class PackRegistry:
    def __init__(self, table_name: str, client: Any) -> None:
        self.table_name = table_name
        self.client = client

    # --- reads -------------------------------------------------------------------------------------------

    def get(self, pack_id: str) -> PackRecord | None:
        response = self.client.get_item(TableName=self.table_name, Key=pack_key(pack_id), ConsistentRead=True)
        item = response.get("Item")
        return PackRecord.from_item(item) if item else None

    def get_many(self, pack_ids: Iterable[str]) -> dict[str, PackRecord]:
        """Records of the packs that have one (consistent: a pack presigned a moment ago is seen)."""
        keys = [pack_key(pack_id) for pack_id in sorted(set(pack_ids))]
        records = (
            PackRecord.from_item(item)
            for item in batch_get(self.client, self.table_name, keys, consistent=True)
        )
        return {record.pack_id: record for record in records}

    def list_host(
        self, host: str, limit: int, after: str | None = None
    ) -> tuple[list[PackRecord], str | None]:
        """Up to `limit` packs `host` may use (its own and, through membership items, shared ones), in pack
        id order after `after` (a pack id); the pack id to continue after, or None when there are no more."""
        condition = "#host = :host"
        values = {":host": host}
        if after is not None:
            # A host holds one item per pack in the index (the pack's or a membership): "after" is exact.
            condition += " AND pk > :after"
            values[":after"] = pack_pk(after)
        response = self.client.query(
            TableName=self.table_name,
            IndexName=BY_HOST_INDEX,
            KeyConditionExpression=condition,
            ExpressionAttributeNames={"#host": "host"},
            ExpressionAttributeValues=values,
            Limit=limit,
        )
        items = response.get("Items", [])
        shared = self.get_many(_pack_id_of(item) for item in items if item["sk"] != PACK_SK)
        records = [
            PackRecord.from_item(item) if item["sk"] == PACK_SK else shared[_pack_id_of(item)]
            for item in items
            # a pack deleted since the query leaves a membership without its pack item
            if item["sk"] == PACK_SK or _pack_id_of(item) in shared
        ]
        last = _pack_id_of(items[-1]) if items else None
        return records, last if "LastEvaluatedKey" in response else None

    def scan(self) -> Iterator[PackRecord]:
        """Every pack record (gc's view of the registry)."""
        request: dict[str, Any] = {
            "TableName": self.table_name,
            "FilterExpression": "sk = :pack",
            "ExpressionAttributeValues": {":pack": PACK_SK},
            "ConsistentRead": True,
        }
        while True:
            response = self.client.scan(**request)
            yield from (PackRecord.from_item(item) for item in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                return
            request["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    # --- the upload API ----------------------------------------------------------------------------------

    def record_presigned(self, pack_id: str, host: str, size: int, retain_until: str) -> PackRecord:
        """Create the pack's item for `host`; if there is one already, return that unchanged."""
        item = {
            **pack_key(pack_id),
            "host": host,
            "hosts": {host},
            "size": size,
            "state": PACK_PRESIGNED,
            "created_at": _now_iso(),
            "retain_until": retain_until,
        }
        return self._create_or_get(item)

    def add_host(self, pack_id: str, host: str) -> bool:
        """Let `host` use the pack (and list it); False if there is no item or gc is deleting the pack."""
        add = {
            "Update": {
                "TableName": self.table_name,
                "Key": pack_key(pack_id),
                "UpdateExpression": "ADD hosts :host",
                # Not the first host: its pack item lists the pack under it already.
                "ConditionExpression": "attribute_exists(pk) AND #state <> :deleting AND #host <> :name",
                "ExpressionAttributeNames": {**_STATE, "#host": "host"},
                "ExpressionAttributeValues": {":host": {host}, ":deleting": PACK_DELETING, ":name": host},
            }
        }
        member = {"Put": {"TableName": self.table_name, "Item": membership_item(pack_id, host)}}
        if self._transact([add, member]):
            return True
        record = self.get(pack_id)  # the first host, already a member; else missing or being deleted
        return record is not None and record.state != PACK_DELETING and host in record.hosts

    # --- the commit and the verifier ---------------------------------------------------------------------

    def mark_verified(self, pack_id: str, blob_count: int) -> bool:
        """Every blob was re-hashed against the trailer; False if the pack is no longer presigned/verified."""
        return _conditionally(self.client.update_item, self.verified_update(pack_id, blob_count)["Update"])

    def verified_update(self, pack_id: str, blob_count: int) -> dict[str, Any]:
        """mark_verified as a TransactWriteItems element (the commit verifies small packs inline)."""
        return {
            "Update": {
                "TableName": self.table_name,
                "Key": pack_key(pack_id),
                "UpdateExpression": "SET #state = :verified, verified_at = :now, blob_count = :count",
                "ConditionExpression": "#state IN (:presigned, :verified)",
                "ExpressionAttributeNames": dict(_STATE),
                "ExpressionAttributeValues": {
                    ":verified": PACK_VERIFIED,
                    ":presigned": PACK_PRESIGNED,
                    ":now": _now_iso(),
                    ":count": blob_count,
                },
            }
        }

    def mark_corrupt(self, pack_id: str, reason: str) -> bool:
        """The pack failed verification; False if there is no item or gc is deleting it (it goes anyway)."""
        return self._update(
            pack_id,
            "SET #state = :corrupt, corrupt_reason = :reason, corrupt_at = :now",
            "attribute_exists(pk) AND #state <> :deleting",
            {
                ":corrupt": PACK_CORRUPT,
                ":reason": reason[:MAX_REASON_CHARS],
                ":now": _now_iso(),
                ":deleting": PACK_DELETING,
            },
        )

    # --- gc ------------------------------------------------------------------------------------------------

    def condemn(self, pack_id: str, now: datetime, superseded_by: str | None = None) -> bool:
        """Mark the pack dead (remembering its state for `revive`); False if its state moved on."""
        expression = "SET state_before_condemned = #state, #state = :condemned, condemned_at = :now"
        values: dict[str, Any] = {
            ":condemned": PACK_CONDEMNED,
            ":now": iso_utc(now),
            ":presigned": PACK_PRESIGNED,
            ":verified": PACK_VERIFIED,
            ":corrupt": PACK_CORRUPT,
        }
        if superseded_by is not None:
            expression += ", superseded_by = :superseded"
            values[":superseded"] = superseded_by
        # Any state not already on its way out: a corrupt pack nobody uses is dead too.
        return self._update(pack_id, expression, "#state IN (:presigned, :verified, :corrupt)", values)

    def revive(self, pack_id: str) -> bool:
        """A condemned pack is needed again: back to the state it had; False if it is not condemned."""
        return self._update(
            pack_id,
            "SET #state = state_before_condemned REMOVE condemned_at, state_before_condemned, superseded_by",
            "#state = :condemned",
            {":condemned": PACK_CONDEMNED},
        )

    def start_deleting(self, pack_id: str, condemned_at: str) -> bool:
        """condemned -> deleting, unless it was revived (or revived and condemned again) since gc looked."""
        return self._update(
            pack_id,
            "SET #state = :deleting, deleting_at = :now",
            "#state = :condemned AND condemned_at = :condemned_at",
            {
                ":deleting": PACK_DELETING,
                ":now": _now_iso(),
                ":condemned": PACK_CONDEMNED,
                ":condemned_at": condemned_at,
            },
        )

    def delete(self, pack_id: str) -> bool:
        """Drop the items of a pack gc is deleting (its object versions are gone); False if it is not."""
        record = self.get(pack_id)
        if record is None or record.state != PACK_DELETING:
            return False
        # A deleting pack gains no members (add_host refuses it): its memberships can go first.
        for host in sorted(record.hosts - {record.host}):
            self.client.delete_item(TableName=self.table_name, Key=membership_key(pack_id, host))
        return _conditionally(
            self.client.delete_item,
            {
                "TableName": self.table_name,
                "Key": pack_key(pack_id),
                "ConditionExpression": "#state = :deleting",
                "ExpressionAttributeNames": dict(_STATE),
                "ExpressionAttributeValues": {":deleting": PACK_DELETING},
            },
        )

    def record_repacked(
        self, pack_id: str, hosts: Iterable[str], size: int, blob_count: int, retain_until: str
    ) -> PackRecord:
        """A pack gc wrote (verified: gc built it from checked blobs); an existing item is returned as is."""
        allowed = set(hosts)
        first = min(allowed)
        now = _now_iso()
        item = {
            **pack_key(pack_id),
            "host": first,
            "hosts": allowed,
            "size": size,
            "state": PACK_VERIFIED,
            "created_at": now,
            "verified_at": now,
            "retain_until": retain_until,
            "blob_count": blob_count,
        }
        members = [membership_item(pack_id, host) for host in sorted(allowed - {first})]
        return self._create_or_get(item, members)

    # --- the retention worker ----------------------------------------------------------------------------

    def raise_retain_until(self, pack_id: str, until: str) -> bool:
        """Record a longer lock; never shortens it. False if the item is gone or already locked as long."""
        return self._update(
            pack_id,
            "SET retain_until = :until",
            "attribute_exists(pk) AND retain_until < :until",
            {":until": until},
        )

    # --- helpers -------------------------------------------------------------------------------------------

    def _create_or_get(self, item: dict[str, Any], members: list[dict[str, Any]] | None = None) -> PackRecord:
        """Put `item` (and its membership items) if the pack has none; else the existing record, unchanged."""
        members = members or []
        create = {
            "Put": {
                "TableName": self.table_name,
                "Item": item,
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        }
        puts = [{"Put": {"TableName": self.table_name, "Item": member}} for member in members]
        while True:
            if self._transact([create, *puts[:MEMBERS_PER_TRANSACTION]]):
                for member in members[MEMBERS_PER_TRANSACTION:]:
                    self.client.put_item(TableName=self.table_name, Item=member)
                return PackRecord.from_item(item)
            existing = self.get(_pack_id_of(item))
            if existing is not None:  # else gc deleted it in between: try again
                return existing

    def _transact(self, items: list[dict[str, Any]]) -> bool:
        """One TransactWriteItems (a single item as its plain call); False if a condition failed."""
        if len(items) == 1:
            ((kind, request),) = items[0].items()
            call = {"Put": self.client.put_item, "Update": self.client.update_item}[kind]
            return _conditionally(call, request)
        try:
            self.client.transact_write_items(TransactItems=items)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                raise
            return False
        return True

    def _update(self, pack_id: str, expression: str, condition: str, values: dict[str, Any]) -> bool:
        """A conditional update; False when the condition does not hold."""
        request: dict[str, Any] = {
            "TableName": self.table_name,
            "Key": pack_key(pack_id),
            "UpdateExpression": expression,
            "ConditionExpression": condition,
            "ExpressionAttributeValues": values,
        }
        if "#state" in expression or "#state" in condition:
            request["ExpressionAttributeNames"] = dict(_STATE)
        return _conditionally(self.client.update_item, request)


def _conditionally(call: Callable[..., Any], request: dict[str, Any]) -> bool:
    """Make a conditional write; False (nothing written) when its condition does not hold."""
    try:
        call(**request)
    except ClientError as error:
        if not is_condition_failure(error):
            raise
        return False
    return True
