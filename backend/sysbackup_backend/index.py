"""The blob index and pack registry (BlobIndexTable); items as in docs/ARCHITECTURE.md "DynamoDB items"."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import ClientError
from sysbackup_domain.packs import PackEntry
from sysbackup_domain.retention import iso_utc

from .dynamo import batch_get, batch_put, is_condition_failure

VERIFIED_SK = "verified"
PACK_SK = "pack"
PACK_PRESIGNED = "presigned"
PACK_REGISTERED = "registered"
PACK_VERIFIED = "verified"
PACK_CORRUPT = "corrupt"
# gc is deleting the pack's object versions: nothing may be indexed into it any more (see claim_pack).
PACK_DELETING = "deleting"
_LOCATION_FIELDS = ("pack_id", "offset", "length", "raw_length", "codec", "kind")


class PackCollecting(Exception):
    """gc is deleting this pack: the caller must store its blobs again, in another pack."""

    def __init__(self, pack_id: str) -> None:
        super().__init__(f"pack {pack_id} is being collected by gc; send its blobs again in a new pack")
        self.pack_id = pack_id


def blob_pk(blob: str) -> str:
    return f"blob#{blob}"


def pack_pk(pack_id: str) -> str:
    return f"pack#{pack_id}"


def host_sk(host: str) -> str:
    return f"host#{host}"


def closed_sk(host: str) -> str:
    """A host's mark that the whole subtree under a tree (or a stream index's chunks) was found stored."""
    return f"closed#{host}"


def _now_iso() -> str:
    return iso_utc(datetime.now(timezone.utc))


@dataclass(frozen=True)
class BlobLocation:
    pack_id: str
    offset: int
    length: int
    raw_length: int
    codec: str
    kind: str
    verified: bool

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> BlobLocation:
        return cls(
            pack_id=str(item["pack_id"]),
            offset=int(item["offset"]),
            length=int(item["length"]),
            raw_length=int(item["raw_length"]),
            codec=str(item["codec"]),
            kind=str(item["kind"]),
            verified=item["sk"] == VERIFIED_SK,
        )

    def entry(self, blob: str) -> PackEntry:
        return PackEntry(
            hash=blob,
            kind=self.kind,
            codec=self.codec,
            offset=self.offset,
            length=self.length,
            raw_length=self.raw_length,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pack_id": self.pack_id,
            "offset": self.offset,
            "length": self.length,
            "codec": self.codec,
            "raw_length": self.raw_length,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class BlobStatus:
    """What the index says about one blob, for one host."""

    location: BlobLocation | None  # verified if there is one, else the host's own claim
    condemned: bool
    closed: bool  # the host's closed mark (only asked for when walking trees)
    source_sk: str | None = None  # sort key of the item the location came from
    in_corrupt_pack: bool = False  # an unverified claim on a pack the verifier found corrupt

    @property
    def stored(self) -> bool:
        return self.location is not None and not self.condemned and not self.in_corrupt_pack


def _preferred_item(verified: dict[str, Any] | None, claim: dict[str, Any] | None) -> dict[str, Any] | None:
    """The item a lookup answers from: the verified copy, else the host's own claim; an uncondemned one first.

    A host that sends a condemned blob again (in a new pack, or registering the same pack again) has a fresh
    claim while the verified item stays condemned until the verifier re-reads a pack holding it: the blob is
    stored for that host meanwhile, from its claim.
    """
    for item in (verified, claim):
        if item is not None and "condemned_at" not in item:
            return item
    return verified or claim


def _location_item(blob: str, sk: str, entry: PackEntry, pack_id: str, stamp_field: str) -> dict[str, Any]:
    return {
        "pk": blob_pk(blob),
        "sk": sk,
        "pack_id": pack_id,
        "offset": entry.offset,
        "length": entry.length,
        "raw_length": entry.raw_length,
        "codec": entry.codec,
        "kind": entry.kind,
        stamp_field: _now_iso(),
    }


class BlobIndex:
    def __init__(self, table_name: str, client: Any) -> None:
        self.table_name = table_name
        self.client = client

    # --- reads -------------------------------------------------------------------------------------------

    def lookup(self, host: str, hashes: Iterable[str], with_closed: bool = False) -> dict[str, BlobStatus]:
        """Status of every hash: verified location preferred, else the host's own claim; condemned wins."""
        wanted = sorted(set(hashes))
        sort_keys = [VERIFIED_SK, host_sk(host)] + ([closed_sk(host)] if with_closed else [])
        keys = [{"pk": blob_pk(blob), "sk": sk} for blob in wanted for sk in sort_keys]
        by_blob: dict[str, dict[str, dict[str, Any]]] = {blob: {} for blob in wanted}
        for item in batch_get(self.client, self.table_name, keys):
            by_blob[item["pk"].removeprefix("blob#")][item["sk"]] = item
        statuses: dict[str, BlobStatus] = {}
        for blob, items in by_blob.items():
            verified, claim, closed = (
                items.get(VERIFIED_SK),
                items.get(host_sk(host)),
                items.get(closed_sk(host)),
            )
            source = _preferred_item(verified, claim)
            statuses[blob] = BlobStatus(
                location=BlobLocation.from_item(source) if source else None,
                condemned=source is not None and "condemned_at" in source,
                closed=closed is not None and "condemned_at" not in closed,
                source_sk=source["sk"] if source else None,
            )
        return self._flag_corrupt_packs(statuses)

    def _flag_corrupt_packs(self, statuses: dict[str, BlobStatus]) -> dict[str, BlobStatus]:
        """Unverified claims whose pack the verifier found corrupt do not count as stored, nor (as condemned)
        claims on a pack gc is deleting.

        (A claim is indexed before the verifier has looked; verified items only ever come from good packs.
        gc deletes a pack only once every item on it is condemned, so a verified item there is condemned.)
        """
        claimed_packs = {
            status.location.pack_id
            for status in statuses.values()
            if status.location is not None and not status.location.verified
        }
        if not claimed_packs:
            return statuses
        states = {pack_id: item.get("state") for pack_id, item in self.get_packs(claimed_packs).items()}
        flagged: dict[str, BlobStatus] = {}
        for blob, status in statuses.items():
            state = (
                states.get(status.location.pack_id)
                if status.location and not status.location.verified
                else None
            )
            if state == PACK_CORRUPT:
                status = replace(status, in_corrupt_pack=True)
            elif state == PACK_DELETING:
                status = replace(status, condemned=True)
            flagged[blob] = status
        return flagged

    def stored_for(self, host: str, hashes: Iterable[str]) -> set[str]:
        """Hashes that are verified, or claimed by this same host; never condemned ones."""
        return {blob for blob, status in self.lookup(host, hashes).items() if status.stored}

    def locate(self, host: str, hashes: Iterable[str]) -> dict[str, BlobLocation]:
        """Where each stored blob is (verified first, else the host's own claim); unknown ones are absent."""
        return {
            blob: status.location
            for blob, status in self.lookup(host, hashes).items()
            if status.stored and status.location is not None
        }

    def get_packs(self, pack_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = [{"pk": pack_pk(pack_id), "sk": PACK_SK} for pack_id in sorted(set(pack_ids))]
        return {
            item["pk"].removeprefix("pack#"): item for item in batch_get(self.client, self.table_name, keys)
        }

    def get_pack(self, pack_id: str) -> dict[str, Any] | None:
        response = self.client.get_item(
            TableName=self.table_name, Key={"pk": pack_pk(pack_id), "sk": PACK_SK}, ConsistentRead=True
        )
        return response.get("Item")

    # --- writes by the upload API ----------------------------------------------------------------------

    def record_presigned(self, pack_id: str, host: str, size: int, retain_until: str) -> None:
        """Remember a presigned pack (first presign wins: the key is content-addressed)."""
        try:
            self.client.put_item(
                TableName=self.table_name,
                Item={
                    "pk": pack_pk(pack_id),
                    "sk": PACK_SK,
                    "host": host,
                    "size": size,
                    "state": PACK_PRESIGNED,
                    "created_at": _now_iso(),
                    "retain_until": retain_until,
                },
                ConditionExpression="attribute_not_exists(pk)",
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise

    def claim_pack(self, pack_id: str, must_exist: bool = True) -> None:
        """Announce, on the pack item, that blob items are about to be indexed into the pack.

        Bumps `version` and stamps `indexed_at` unless gc has moved the pack to `deleting`
        (PackCollecting then). gc moves it there only if `version` is what its index scan saw and
        `indexed_at` is older than the grace period, so any writer that announced itself either
        finished long before the scan (its items were scanned) or makes gc keep the pack.
        """
        exists = "attribute_exists(pk) AND " if must_exist else ""
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
                UpdateExpression="SET indexed_at = :now ADD version :one",
                ConditionExpression=f"{exists}(attribute_not_exists(#state) OR #state <> :deleting)",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={":now": _now_iso(), ":one": 1, ":deleting": PACK_DELETING},
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise
            raise PackCollecting(pack_id) from None

    def register_pack(self, host: str, pack_id: str, entries: Sequence[PackEntry]) -> None:
        """Index the pack's blobs as this host's (unverified) claims, then mark the pack registered.

        Raises PackCollecting (indexing nothing) if gc is deleting the pack.
        """
        self.claim_pack(pack_id)
        batch_put(
            self.client,
            self.table_name,
            (_location_item(entry.hash, host_sk(host), entry, pack_id, "registered_at") for entry in entries),
        )
        self.client.update_item(
            TableName=self.table_name,
            Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
            UpdateExpression="SET blob_count = :count, registered_at = :now ADD hosts :host",
            ExpressionAttributeValues={":count": len(entries), ":now": _now_iso(), ":host": {host}},
        )
        # The verifier may well have run first: never move a verified or corrupt pack back to registered.
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
                UpdateExpression="SET #state = :registered",
                ConditionExpression="attribute_not_exists(#state) OR #state IN (:presigned, :registered)",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    ":registered": PACK_REGISTERED,
                    ":presigned": PACK_PRESIGNED,
                },
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise

    def record_closed(self, host: str, hashes: Iterable[str]) -> None:
        stamp = _now_iso()
        batch_put(
            self.client,
            self.table_name,
            (
                {"pk": blob_pk(blob), "sk": closed_sk(host), "closed_at": stamp}
                for blob in sorted(set(hashes))
            ),
        )

    # --- writes by the verifier ------------------------------------------------------------------------

    def record_verified(self, pack_id: str, entries: Sequence[PackEntry]) -> int:
        """Index re-hashed blobs as verified; returns how many got a new verified item.

        A blob already verified (in any pack) keeps its location: the first verified copy wins. Two verifiers
        racing on the same blob both write true locations, so a plain batch write after a batch read is safe.
        A condemned verified item is replaced: the blob is stored again, in this pack.
        Raises PackCollecting (indexing nothing) if gc is deleting the pack.
        """
        self.claim_pack(pack_id, must_exist=False)  # an index rebuild verifies packs that have no item yet
        existing = {
            item["pk"].removeprefix("blob#")
            for item in batch_get(
                self.client,
                self.table_name,
                [
                    {"pk": blob_pk(entry.hash), "sk": VERIFIED_SK}
                    for entry in {e.hash: e for e in entries}.values()
                ],
            )
            if "condemned_at" not in item
        }
        fresh = {entry.hash: entry for entry in entries if entry.hash not in existing}
        batch_put(
            self.client,
            self.table_name,
            (
                _location_item(blob, VERIFIED_SK, entry, pack_id, "verified_at")
                for blob, entry in fresh.items()
            ),
        )
        self.client.update_item(
            TableName=self.table_name,
            Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
            UpdateExpression="SET #state = :verified, verified_at = :now, blob_count = :count",
            ConditionExpression="attribute_not_exists(#state) OR #state <> :deleting",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":verified": PACK_VERIFIED,
                ":now": _now_iso(),
                ":count": len(entries),
                ":deleting": PACK_DELETING,
            },
        )
        return len(fresh)

    def record_corrupt(self, pack_id: str, reason: str) -> None:
        """Mark the pack corrupt (a pack gc is deleting stays `deleting`: it is going anyway)."""
        try:
            self.client.update_item(
                TableName=self.table_name,
                Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
                UpdateExpression="SET #state = :corrupt, corrupt_reason = :reason, corrupt_at = :now",
                ConditionExpression="attribute_not_exists(#state) OR #state <> :deleting",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    ":corrupt": PACK_CORRUPT,
                    ":reason": reason[:1000],
                    ":now": _now_iso(),
                    ":deleting": PACK_DELETING,
                },
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise
