"""Committing a manifest: validate, walk what it references, write the document and the catalogue items.

Guarantee: a manifest is committed only after every blob it references is stored: the parent's (the host's
HEAD) at the same place, or in the trailer of a listed pack the host may use (docs/PACK_INDEX.md, "The
commit walk"). The walk (walk.py) may span several API calls through a job. A one-file change costs one
BatchGetItem (HEAD, the parent's summary, gc's epoch, the listed packs), the S3 GETs of the changed trees,
the manifest PUT and one TransactWriteItems.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aws_lambda_powertools import Logger
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.manifest import (
    CommitRequest,
    build_manifest,
    decode_manifest,
    encode_manifest,
    new_manifest_id,
    parse_commit_request,
)
from sysbackup_domain.retention import RetentionPolicy, iso_utc
from sysbackup_domain.retention import retain_until as compute_retain_until

from .catalogue import HEAD_ID, Catalogue, ManifestSummary, TransactionRefused
from .dynamo import BATCH_GET_LIMIT, chunks
from .errors import ApiError, Conflict, NotFound, Unprocessable
from .gc import EPOCH_KEY, GcEpoch, epoch_unchanged_check
from .jobs import JOB_FAILED, JOB_RUNNING, JOB_SUCCEEDED, Job, JobStore
from .registry import PACK_PRESIGNED, PackRecord, PackRegistry, pack_key
from .retention_worker import RetentionQueue
from .store import PackStore, manifest_key
from .walk import MAX_REPORTED_PROBLEMS, STREAM, TREE, Budget, ListedPacks, TreeWalker, WalkState

logger = Logger(child=True)

COMMIT_JOB_KIND = "commit"
# The transaction: HEAD's update, the summary's put, gc's epoch check, then the inline-verified packs.
_EPOCH_CHECK_INDEX = 2
_FIRST_PACK_UPDATE_INDEX = 3
# A VerifyQueue message names at most this many packs (docs/PACK_INDEX.md); SQS batches hold 10 messages.
VERIFY_PACKS_PER_MESSAGE = 300
SQS_BATCH_ENTRIES = 10
_READ_ROUNDS = 10
# How many refused blobs a 422 message names (the body lists them all).
_NAMED_IN_MESSAGE = 3


class StaleWalk(Exception):
    """What the walk relied on changed before its transaction: it walks again from the top."""


class GcRaced(StaleWalk):
    """gc began condemning after this walk started: the walk may have trusted a pack gc then condemned."""


@dataclass(frozen=True)
class CommitOutcome:
    """An HTTP answer: 201 committed, 202 still walking, or a 4xx for a job that failed."""

    status_code: int
    body: dict[str, Any]


@dataclass(frozen=True)
class CommitStart:
    """What a walk starts from, read in one BatchGetItem."""

    head: str | None
    parent: ManifestSummary | None
    epoch: GcEpoch
    records: dict[str, PackRecord]


class VerifyQueue:
    """Sends packs a commit used while still presigned to VerifyQueue (the verifier re-hashes them)."""

    def __init__(self, queue_url: str, client: Any) -> None:
        self.queue_url = queue_url
        self.client = client

    def request(self, pack_ids: Iterable[str], source: str) -> int:
        """Enqueue `{"packs", "source"}` messages; returns how many were sent. Raises if SQS refuses."""
        messages = [
            json.dumps({"packs": list(group), "source": source})
            for group in chunks(sorted(set(pack_ids)), VERIFY_PACKS_PER_MESSAGE)
        ]
        for batch in chunks(messages, SQS_BATCH_ENTRIES):
            response = self.client.send_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(number), "MessageBody": body} for number, body in enumerate(batch)],
            )
            if response.get("Failed"):
                raise RuntimeError(f"VerifyQueue refused {len(response['Failed'])} messages")
        return len(messages)


def verify_queue_from_environment(
    env: Mapping[str, str], client_factory: Callable[[], Any]
) -> VerifyQueue | None:
    """VerifyQueue from VERIFY_QUEUE_URL, or None where the function has no queue (not wired)."""
    url = str(env.get("VERIFY_QUEUE_URL", "")).strip()
    return VerifyQueue(url, client_factory()) if url else None


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _listed_pack_ids(request: CommitRequest) -> list[str]:
    """Every pack whose record the walk needs: the listed ones and those the location hints name."""
    hinted = (location.pack_id for location in request.locations.values())
    return list(dict.fromkeys([*request.packs, *hinted]))


def _readable(request: CommitRequest) -> set[str]:
    """Blobs besides trees the walk may read from listed packs: stream indexes (and what the host hinted)."""
    contents = {snapshot.content for snapshot in request.snapshots if snapshot.content is not None}
    return contents | request.locations.keys()


def _refusal(state: WalkState, listed: ListedPacks) -> Unprocessable | None:
    """The 422 for a finished walk that found problems, or None if the manifest may be committed."""
    reasons = {**listed.refused, **state.refused_packs}
    used_refused = sorted(pack_id for pack_id in state.packs if pack_id in reasons)
    missing = sorted(set(state.missing))
    if not missing and not state.invalid and not used_refused:
        return None
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} blobs are not stored in a pack you listed and may use ({_named(missing)})"
        )
    if state.invalid:
        named = "; ".join(f"{blob}: {why}" for blob, why in sorted(state.invalid.items())[:_NAMED_IN_MESSAGE])
        parts.append(f"{len(state.invalid)} blobs are not what they are referenced as ({named})")
    if used_refused:
        parts.append(f"packs holding its blobs were refused ({_named(used_refused)})")
    # The body is also a job's stored result (a DynamoDB item, < 400 KB): the first MAX_REPORTED_PROBLEMS;
    # the host learns of the rest when it commits again.
    return Unprocessable(
        "the manifest cannot be committed: " + "; ".join(parts),
        missing=missing[:MAX_REPORTED_PROBLEMS],
        packs=reasons,
    )


def _named(hashes: list[str]) -> str:
    more = len(hashes) - _NAMED_IN_MESSAGE
    return ", ".join(hashes[:_NAMED_IN_MESSAGE]) + (f" and {more} more" if more > 0 else "")


class Committer:
    def __init__(
        self,
        registry: PackRegistry,
        store: PackStore,
        catalogue: Catalogue,
        jobs: JobStore,
        policy: RetentionPolicy,
        clock: Callable[[], datetime] = _utc_now,
        retention_queue: RetentionQueue | None = None,
        verify_queue: VerifyQueue | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.catalogue = catalogue
        self.jobs = jobs
        self.policy = policy
        self.clock = clock
        self.retention_queue = retention_queue
        self.verify_queue = verify_queue

    def start(self, host: str, body: object, budget: Budget) -> CommitOutcome:
        """POST /manifests: 201, or 202 with a job when the walk needs more calls; raises ApiError."""
        request = self._parse(body)
        begun = self._read_start(host, request)
        if begun.head != request.parent:
            # Checked first (cheaply) so a cloned host learns at once; checked again atomically at commit.
            raise Conflict(
                f"parent {request.parent!r} is not the current head of host {host!r}", current=begun.head
            )
        state = self._fresh_state(request, begun)
        return self._walk_and_commit(host, request, dict(body), state, begun.records, None, budget)  # type: ignore[call-overload]

    def resume(self, host: str, job_id: str, budget: Budget) -> CommitOutcome:
        """GET /jobs/{id}: continue the walk for another budget; a finished job answers what it ended with."""
        job = self.jobs.load(job_id)
        if job is None or job.host != host or job.kind != COMMIT_JOB_KIND:
            raise NotFound(f"no job {job_id!r} for host {host!r}")
        if job.state != JOB_RUNNING:
            return self._finished_outcome(job)
        request = self._parse(job.request)
        state = WalkState.from_bytes(job.progress)
        records = self.registry.get_many(_listed_pack_ids(request))
        return self._walk_and_commit(host, request, job.request, state, records, job, budget)

    def _read_start(self, host: str, request: CommitRequest) -> CommitStart:
        """HEAD, the parent's summary, gc's epoch and the packs' records: one BatchGetItem (more only past
        100 keys)."""
        catalogue_keys = [{"host": host, "manifest_id": HEAD_ID}]
        if request.parent is not None:
            catalogue_keys.append({"host": host, "manifest_id": request.parent})
        pack_ids = _listed_pack_ids(request)
        room = BATCH_GET_LIMIT - len(catalogue_keys) - 1
        found = _batch_get_tables(
            self.registry.client,
            {
                self.catalogue.table_name: catalogue_keys,
                self.registry.table_name: [
                    dict(EPOCH_KEY),
                    *(pack_key(pack_id) for pack_id in pack_ids[:room]),
                ],
            },
        )
        catalogue_items = {item["manifest_id"]: item for item in found[self.catalogue.table_name]}
        registry_items = found[self.registry.table_name]
        epoch_item = next((item for item in registry_items if item["pk"] == EPOCH_KEY["pk"]), {})
        records = {
            record.pack_id: record
            for record in (
                PackRecord.from_item(item) for item in registry_items if item["pk"] != EPOCH_KEY["pk"]
            )
        }
        if pack_ids[room:]:
            records.update(self.registry.get_many(pack_ids[room:]))
        parent_item = catalogue_items.get(request.parent) if request.parent is not None else None
        return CommitStart(
            head=catalogue_items.get(HEAD_ID, {}).get("current"),
            parent=ManifestSummary.from_item(parent_item) if parent_item else None,
            epoch=GcEpoch.from_item(epoch_item),
            records=records,
        )

    def _fresh_state(self, request: CommitRequest, begun: CommitStart) -> WalkState:
        """A walk from the top, diffed against the parent, stamped with gc's epoch (-1 while gc is condemning:
        such a walk may not commit)."""
        parent = begun.parent
        pairs: list[tuple[str, str | None, str]] = []
        if request.root is not None:
            pairs.append((request.root, parent.root if parent is not None else None, TREE))
        contents = {snapshot.name: snapshot.content for snapshot in request.snapshots if snapshot.content}
        before = self._parent_snapshots(parent) if contents and parent is not None else {}
        pairs.extend((content, before.get(name), STREAM) for name, content in contents.items())
        state = WalkState.start(pairs)
        state.gc_epoch = begun.epoch.number if begun.epoch.stable(self.clock()) else -1
        return state

    def _parent_snapshots(self, parent: ManifestSummary) -> dict[str, str | None]:
        """The parent's snapshot contents by name (from its document: summaries do not hold them)."""
        manifest = decode_manifest(self.store.read(parent.key))
        return {snapshot.name: snapshot.content for snapshot in manifest.snapshots}

    def _walk_and_commit(
        self,
        host: str,
        request: CommitRequest,
        body: dict[str, Any],
        state: WalkState,
        records: dict[str, PackRecord],
        job: Job | None,
        budget: Budget,
    ) -> CommitOutcome:
        """Walk, then commit; a walk gc overtook (it condemned meanwhile) starts again from the top."""
        while True:
            listed = ListedPacks(self.registry, self.store, host, records, _readable(request)).load(
                request.packs
            )
            TreeWalker(self.store, listed, request.locations).run(state, budget)
            if not state.done:
                return self._defer(host, body, state, job)
            refusal = _refusal(state, listed)
            if refusal is not None:
                return self._refuse(job, refusal)
            try:
                return self._commit(host, request, state, listed, job)
            except StaleWalk as stale:
                logger.info("walking again", extra={"host": host, "why": type(stale).__name__})
                begun = self._read_start(host, request)
                state, records = self._fresh_state(request, begun), begun.records
                if state.gc_epoch < 0 or budget.expired():
                    return self._defer(host, body, state, job)
            except ApiError as error:
                return self._refuse(job, error)

    def _defer(self, host: str, body: dict[str, Any], state: WalkState, job: Job | None) -> CommitOutcome:
        """202: the walk goes on in the next call (a job is made on the first deferral)."""
        if job is None:
            job = self.jobs.create(COMMIT_JOB_KIND, host, body, state.to_bytes())
        else:
            self.jobs.save_progress(job, state.to_bytes())
        return CommitOutcome(202, {"job_id": job.job_id, "state": JOB_RUNNING})

    def _refuse(self, job: Job | None, error: ApiError) -> CommitOutcome:
        """A refusal: raised for a direct POST, recorded as the job's outcome for a job."""
        if job is None:
            raise error
        return self._fail_job(job, error)

    def _parse(self, body: object) -> CommitRequest:
        try:
            return parse_commit_request(body)
        except InvalidDocument as error:
            raise Unprocessable(f"malformed manifest: {error}") from None

    def _commit(
        self, host: str, request: CommitRequest, state: WalkState, listed: ListedPacks, job: Job | None
    ) -> CommitOutcome:
        if state.gc_epoch < 0:
            raise GcRaced()  # the walk began while gc was condemning: what it saw may be stale
        now = self.clock()
        try:
            until = compute_retain_until(now, self.policy, request.days_retained)
        except ValueError as error:
            raise Unprocessable(str(error)) from None
        manifest = build_manifest(
            request, manifest_id=new_manifest_id(now), host=host, created=now, retain_until=until
        )
        key = manifest_key(host, manifest.id)
        # Document first: a crash before the catalogue write leaves only an unreferenced locked object.
        self.store.put_manifest(key, encode_manifest(manifest), until, self.policy.lock_mode)
        summary = ManifestSummary(
            host=host,
            manifest_id=manifest.id,
            created=iso_utc(now),
            parent=request.parent,
            root=request.root,
            retain_until=iso_utc(until),
            stats=dict(request.stats),
            key=key,
        )
        result = {"manifest_id": manifest.id, "retain_until": iso_utc(until)}
        verified = sorted(listed.verified_inline.items())
        extra = [
            epoch_unchanged_check(self.registry, state.gc_epoch),
            *(self.registry.verified_update(pack_id, count) for pack_id, count in verified),
        ]
        if job is not None:
            extra.append(self.jobs.finish_item(job, JOB_SUCCEEDED, {"status": 201, "body": result}))
        try:
            self.catalogue.commit(summary, request.parent, extra)
        except Conflict:
            if job is not None and (outcome := self._if_finished_elsewhere(job)) is not None:
                return outcome
            raise
        except TransactionRefused as refused:
            if job is not None and (outcome := self._if_finished_elsewhere(job)) is not None:
                return outcome
            failed = {index for index, code in enumerate(refused.reasons) if code == "ConditionalCheckFailed"}
            if _EPOCH_CHECK_INDEX in failed:
                raise GcRaced() from None
            # An inline-verified pack changed state meanwhile: the next walk sees its new state.
            raise StaleWalk() from None
        self._after_head_moved(state, listed, until, manifest.id)
        body = {**result, **({"job_id": job.job_id, "state": JOB_SUCCEEDED} if job else {})}
        return CommitOutcome(201, body)

    def _after_head_moved(
        self, state: WalkState, listed: ListedPacks, until: datetime, manifest_id: str
    ) -> None:
        """Lock extensions and verification for the packs the manifest newly uses. Failures are logged: the
        manifest is committed; gc requests every live pack's missing lock, and the verifier is a backstop."""
        used = [listed.records[pack_id] for pack_id in state.packs if pack_id in listed.records]
        short = [record.pack_id for record in used if record.retain_until < iso_utc(until)]
        unverified = [
            record.pack_id
            for record in used
            if record.state == PACK_PRESIGNED and record.pack_id not in listed.verified_inline
        ]
        if self.retention_queue is not None and short:
            try:
                self.retention_queue.request(short, until, manifest_id)
            except Exception:
                logger.exception("could not request pack lock extensions", extra={"manifest_id": manifest_id})
        if self.verify_queue is not None and unverified:
            try:
                self.verify_queue.request(unverified, manifest_id)
            except Exception:
                logger.exception("could not request pack verification", extra={"manifest_id": manifest_id})

    def _if_finished_elsewhere(self, job: Job) -> CommitOutcome | None:
        """A concurrent poll may have finished this job: then its outcome is ours."""
        latest = self.jobs.load(job.job_id)
        if latest is not None and latest.state != JOB_RUNNING:
            return self._finished_outcome(latest)
        return None

    def _fail_job(self, job: Job, error: ApiError) -> CommitOutcome:
        result = {"status": error.status_code, "body": error.body()}
        if (
            not self.jobs.finish(job, JOB_FAILED, result)
            and (outcome := self._if_finished_elsewhere(job)) is not None
        ):
            return outcome
        return CommitOutcome(error.status_code, {**error.body(), "job_id": job.job_id, "state": JOB_FAILED})

    def _finished_outcome(self, job: Job) -> CommitOutcome:
        result = job.result or {"status": 500, "body": {"message": "job finished without a result"}}
        return CommitOutcome(
            int(result["status"]), {**result["body"], "job_id": job.job_id, "state": job.state}
        )


def _batch_get_tables(
    client: Any, keys: Mapping[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """One consistent BatchGetItem over several tables (at most 100 keys in all), unprocessed keys retried."""
    found: dict[str, list[dict[str, Any]]] = {table: [] for table in keys}
    request: dict[str, Any] = {
        table: {"Keys": table_keys, "ConsistentRead": True}
        for table, table_keys in keys.items()
        if table_keys
    }
    for round_number in range(_READ_ROUNDS):
        response = client.batch_get_item(RequestItems=request)
        for table, items in response.get("Responses", {}).items():
            found[table].extend(items)
        request = response.get("UnprocessedKeys") or {}
        if not request:
            return found
        time.sleep(min(0.05 * 2**round_number, 1.0))
    raise RuntimeError("DynamoDB kept throttling the commit's BatchGetItem")
