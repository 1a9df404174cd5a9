"""Committing a manifest: validate, walk what it references, write the document and the catalogue items.

Guarantee: a manifest is committed only after every blob it references is stored (verified, or this host's
own registered claim) and not condemned. The walk (walk.py) may span several API calls through a job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aws_lambda_powertools import Logger
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.manifest import (
    CommitRequest,
    build_manifest,
    encode_manifest,
    new_manifest_id,
    parse_commit_request,
)
from sysbackup_domain.retention import RetentionPolicy, iso_utc
from sysbackup_domain.retention import retain_until as compute_retain_until

from .catalogue import Catalogue, ManifestSummary, TransactionRefused
from .errors import ApiError, Conflict, NotFound, Unprocessable
from .gc import epoch_unchanged_check, read_gc_epoch
from .index import BlobIndex, blob_pk
from .jobs import JOB_FAILED, JOB_RUNNING, JOB_SUCCEEDED, Job, JobStore
from .retention_worker import RetentionQueue
from .store import PackStore, manifest_key
from .walk import Budget, TreeWalker, WalkState

logger = Logger(child=True)

COMMIT_JOB_KIND = "commit"
# A DynamoDB transaction holds at most 100 items: HEAD, summary, gc epoch, job, and checks on the anchors.
_MAX_ANCHOR_CHECKS = 90
_EPOCH_CHECK_INDEX = 2  # after HEAD's update and the summary's put


class GcRaced(Exception):
    """gc began condemning after this walk started: the walk may have trusted a blob gc then condemned."""


@dataclass(frozen=True)
class CommitOutcome:
    """An HTTP answer: 201 committed, 202 still walking, or a 4xx for a job that failed."""

    status_code: int
    body: dict[str, Any]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _problems_error(problems: Mapping[str, Any]) -> Unprocessable:
    counts = ", ".join(f"{len(value)} {name}" for name, value in problems.items() if value)
    return Unprocessable(f"the manifest references blobs that are not stored: {counts}", **problems)


class Committer:
    def __init__(
        self,
        index: BlobIndex,
        store: PackStore,
        catalogue: Catalogue,
        jobs: JobStore,
        policy: RetentionPolicy,
        clock: Callable[[], datetime] = _utc_now,
        retention_queue: RetentionQueue | None = None,
    ) -> None:
        self.index = index
        self.store = store
        self.catalogue = catalogue
        self.jobs = jobs
        self.policy = policy
        self.clock = clock
        self.retention_queue = retention_queue

    def start(self, host: str, body: object, budget: Budget) -> CommitOutcome:
        """POST /manifests: 201, or 202 with a job when the walk needs more calls; raises ApiError."""
        request = self._parse(body)
        head = self.catalogue.head(host)
        if head != request.parent:
            # Checked first (cheaply) so a cloned host learns at once; checked again atomically at commit.
            raise Conflict(
                f"parent {request.parent!r} is not the current head of host {host!r}", current=head
            )
        return self._walk_and_commit(host, request, dict(body), self._fresh_state(request), None, budget)  # type: ignore[call-overload]

    def resume(self, host: str, job_id: str, budget: Budget) -> CommitOutcome:
        """GET /jobs/{id}: continue the walk for another budget; a finished job answers what it ended with."""
        job = self.jobs.load(job_id)
        if job is None or job.host != host or job.kind != COMMIT_JOB_KIND:
            raise NotFound(f"no job {job_id!r} for host {host!r}")
        if job.state != JOB_RUNNING:
            return self._finished_outcome(job)
        request = self._parse(job.request)
        state = WalkState.from_bytes(job.progress)
        return self._walk_and_commit(host, request, job.request, state, job, budget)

    def _fresh_state(self, request: CommitRequest) -> WalkState:
        """A walk from the top, stamped with gc's epoch (-1 while gc is condemning: it may not commit)."""
        state = WalkState.start(
            request.root, (snapshot.content for snapshot in request.snapshots if snapshot.content is not None)
        )
        epoch = read_gc_epoch(self.index)
        state.gc_epoch = epoch.number if epoch.stable(self.clock()) else -1
        return state

    def _walk_and_commit(
        self,
        host: str,
        request: CommitRequest,
        body: dict[str, Any],
        state: WalkState,
        job: Job | None,
        budget: Budget,
    ) -> CommitOutcome:
        """Walk, then commit; a walk gc overtook (it condemned meanwhile) starts again from the top."""
        while True:
            TreeWalker(self.index, self.store, host).run(state, budget)
            if not state.done:
                return self._defer(host, body, state, job)
            if state.problem_count:
                return self._refuse(job, _problems_error(state.problems()))
            try:
                return self._commit(host, request, state, job)
            except GcRaced:
                logger.info("gc condemned blobs during the walk; walking again", extra={"host": host})
                state = self._fresh_state(request)
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

    def _commit(self, host: str, request: CommitRequest, state: WalkState, job: Job | None) -> CommitOutcome:
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
        # First extra item (transaction index 2): gc has not begun condemning since the walk started.
        extra = [epoch_unchanged_check(self.index, state.gc_epoch), *self._anchor_checks(state)]
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
            if refused.reasons[_EPOCH_CHECK_INDEX : _EPOCH_CHECK_INDEX + 1] == ["ConditionalCheckFailed"]:
                raise GcRaced() from None
            raise Unprocessable(
                "a blob the manifest references was condemned while committing", reasons=refused.reasons
            ) from None
        self._request_pack_locks(state, until, manifest.id)
        body = {**result, **({"job_id": job.job_id, "state": JOB_SUCCEEDED} if job else {})}
        return CommitOutcome(201, body)

    def _request_pack_locks(self, state: WalkState, until: datetime, manifest_id: str) -> None:
        """Ask the retention worker to lock the walked packs as long as the manifest (after the commit).

        Packs whose recorded lock already covers `until` are left out (a fresh run's packs, locked at presign
        a fold window past the default, need nothing). A failure here does not undo a committed manifest:
        gc requests every live pack's missing lock too.
        """
        if self.retention_queue is None or not state.packs:
            return
        try:
            short = self._packs_locked_short_of(state.packs, until)
            if short:
                self.retention_queue.request(short, until, manifest_id)
        except Exception:  # the manifest is committed; gc's lock check is the backstop
            logger.exception("could not request pack lock extensions", extra={"manifest_id": manifest_id})

    def _packs_locked_short_of(self, pack_ids: list[str], until: datetime) -> list[str]:
        """The packs whose recorded lock (`retain_until` of the pack item) ends before `until`."""
        recorded = self.index.get_packs(pack_ids)
        return [
            pack_id
            for pack_id in pack_ids
            if str(recorded.get(pack_id, {}).get("retain_until", "")) < iso_utc(until)
        ]

    def _anchor_checks(self, state: WalkState) -> list[dict[str, Any]]:
        """Condition checks that the root and stream indexes are still not condemned when HEAD moves."""
        return [
            {
                "ConditionCheck": {
                    "TableName": self.index.table_name,
                    "Key": {"pk": blob_pk(blob), "sk": sort_key},
                    "ConditionExpression": "attribute_exists(pk) AND attribute_not_exists(condemned_at)",
                }
            }
            for blob, sort_key in list(state.anchors.items())[:_MAX_ANCHOR_CHECKS]
        ]

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
