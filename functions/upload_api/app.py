"""Upload API: which blobs are stored, presigned pack uploads, pack registration."""

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field
from sysbackup_backend.adopt import adopt_packs, already_stored_for
from sysbackup_backend.api import BlobHash, register_error_handlers, services, writing_host
from sysbackup_backend.errors import Conflict, Unprocessable
from sysbackup_backend.index import PACK_CORRUPT, PACK_DELETING, BlobIndex, PackCollecting
from sysbackup_backend.store import pack_checksum
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.packs import MAX_PACK_BYTES, TRAILER_TAIL_BYTES, PackEntry
from sysbackup_domain.retention import iso_utc, retain_until

MAX_CHECK_HASHES = 1000
MAX_PACKS_PER_CALL = 100
MAX_ENTRIES_PER_PACK = 20_000
# Each adopted pack costs a HEAD, two ranged GETs and up to MAX_ENTRIES_PER_PACK index writes.
MAX_PACKS_PER_ADOPT = 25
HEAD_PARALLELISM = 8

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)
app = APIGatewayHttpResolver(enable_validation=True)
register_error_handlers(app, logger)


class CheckRequest(BaseModel):
    hashes: list[BlobHash] = Field(max_length=MAX_CHECK_HASHES)


class PackToPresign(BaseModel):
    sha256: BlobHash
    size: int = Field(gt=TRAILER_TAIL_BYTES, le=MAX_PACK_BYTES)


class PresignRequest(BaseModel):
    packs: list[PackToPresign] = Field(min_length=1, max_length=MAX_PACKS_PER_CALL)


class PackToRegister(BaseModel):
    pack_id: BlobHash
    # Entries are validated by the domain's PackEntry.from_json, the one definition of a trailer entry.
    blobs: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ENTRIES_PER_PACK)


class RegisterRequest(BaseModel):
    packs: list[PackToRegister] = Field(min_length=1, max_length=MAX_PACKS_PER_CALL)


class AdoptRequest(BaseModel):
    packs: list[BlobHash] = Field(min_length=1, max_length=MAX_PACKS_PER_ADOPT)


@app.post("/blobs/check")
@tracer.capture_method
def check_blobs(request: CheckRequest) -> dict[str, Any]:
    host = writing_host(app)
    stored = services().index.stored_for(host, request.hashes)
    metrics.add_metric(name="BlobsChecked", unit=MetricUnit.Count, value=len(request.hashes))
    metrics.add_metric(name="BlobsAlreadyStored", unit=MetricUnit.Count, value=len(stored))
    return {"stored": sorted(stored)}


@app.post("/packs/presign")
@tracer.capture_method
def presign_packs(request: PresignRequest) -> dict[str, Any]:
    host = writing_host(app)
    backend = services()
    settings = backend.settings
    packs = {pack.sha256: pack.size for pack in request.packs}
    known = backend.index.get_packs(packs)
    corrupt = sorted(pack_id for pack_id, item in known.items() if item.get("state") == PACK_CORRUPT)
    if corrupt:
        raise Unprocessable("these packs were found corrupt; build new packs", corrupt=corrupt)
    _refuse_collecting(pack_id for pack_id, item in known.items() if item.get("state") == PACK_DELETING)
    # Locked for the stack's default period plus the fold window: the commit that follows finds the lock
    # sufficient (no extension message); the extender stretches it only for longer or later manifests.
    lock_until = retain_until(datetime.now(timezone.utc), settings.retention, None) + settings.fold_window
    registered, uploads, collecting = [], [], []
    for pack_id, size in packs.items():
        if already_stored_for(host, known.get(pack_id)):
            registered.append(pack_id)
            continue
        if pack_id in known and not _claimed(backend.index, pack_id):
            collecting.append(pack_id)
            continue
        backend.index.record_presigned(pack_id, host, size, iso_utc(lock_until))
        upload = backend.store.presign_pack_put(
            pack_id, size, lock_until, settings.retention.lock_mode, settings.upload_url_expiry_seconds
        )
        uploads.append(
            {
                "pack_id": pack_id,
                "url": upload.url,
                "method": "PUT",
                "headers": upload.headers,
                "expires_at": iso_utc(upload.expires_at),
            }
        )
    _refuse_collecting(collecting)
    metrics.add_metric(name="PacksPresigned", unit=MetricUnit.Count, value=len(uploads))
    return {"uploads": uploads, "registered": registered}


def _claimed(index: BlobIndex, pack_id: str) -> bool:
    """Announce a coming registration on an existing pack item, so gc keeps the pack; False if gc is
    already deleting it (the caller's PUT would answer 412 and its registration be refused)."""
    try:
        index.claim_pack(pack_id)
    except PackCollecting:
        return False
    return True


def _refuse_collecting(pack_ids: Iterable[str], **details: Any) -> None:
    """409 naming the packs gc is deleting: the host sends their blobs again in new packs."""
    collecting = sorted(pack_ids)
    if collecting:
        raise Conflict(
            "these packs are being collected by gc; send their blobs again in new packs",
            collecting=collecting,
            **details,
        )


def _validated_entries(pack: PackToRegister, pack_size: int) -> list[PackEntry]:
    try:
        entries = [PackEntry.from_json(blob) for blob in pack.blobs]
    except InvalidDocument as error:
        raise Unprocessable(f"pack {pack.pack_id}: {error}") from None
    blob_area_end = pack_size - TRAILER_TAIL_BYTES
    for entry in entries:
        if entry.offset + entry.length > blob_area_end:
            raise Unprocessable(f"pack {pack.pack_id}: blob {entry.hash} lies past the pack's blob area")
    if len({entry.hash for entry in entries}) != len(entries):
        raise Unprocessable(f"pack {pack.pack_id}: a blob is listed twice")
    return entries


@app.post("/packs/register")
@tracer.capture_method
def register_packs(request: RegisterRequest) -> dict[str, Any]:
    host = writing_host(app)
    backend = services()
    known = backend.index.get_packs(pack.pack_id for pack in request.packs)
    # Up to 100 HEADs: in parallel, so a full batch stays well inside API Gateway's 29 s.
    pack_ids = [pack.pack_id for pack in request.packs]
    with ThreadPoolExecutor(max_workers=HEAD_PARALLELISM) as pool:
        heads = dict(zip(pack_ids, pool.map(backend.store.head_pack, pack_ids), strict=True))
    to_register: list[tuple[str, list[PackEntry]]] = []
    # Everything is checked before anything is indexed, so a refused call indexes nothing.
    for pack in request.packs:
        item = known.get(pack.pack_id)
        if item is None:
            raise Conflict(f"pack {pack.pack_id} was never presigned")
        if item.get("state") == PACK_CORRUPT:
            raise Unprocessable(f"pack {pack.pack_id} was found corrupt")
        _refuse_collecting([pack.pack_id] if item.get("state") == PACK_DELETING else [])
        head = heads[pack.pack_id]
        if head is None:
            raise Conflict(f"pack {pack.pack_id} has not been uploaded")
        if head.size != int(item["size"]) or head.checksum_sha256 != pack_checksum(pack.pack_id):
            raise Unprocessable(f"pack {pack.pack_id} in the bucket does not match its size and SHA-256")
        to_register.append((pack.pack_id, _validated_entries(pack, head.size)))
    registered, collecting = [], []
    for pack_id, entries in to_register:
        try:
            backend.index.register_pack(host, pack_id, entries)
            registered.append(pack_id)
        except PackCollecting:  # gc began deleting it after the checks above
            collecting.append(pack_id)
    metrics.add_metric(name="PacksRegistered", unit=MetricUnit.Count, value=len(registered))
    _refuse_collecting(collecting, registered=registered)
    return {"registered": registered}


@app.post("/packs/adopt")
@tracer.capture_method
def adopt_unregistered_packs(request: AdoptRequest) -> dict[str, Any]:
    """Register, from their trailers, packs this host PUT in a run that crashed before registering them."""
    host = writing_host(app)
    backend = services()
    outcome = adopt_packs(backend.index, backend.store, host, request.packs, MAX_ENTRIES_PER_PACK)
    if outcome.skipped:
        logger.info("packs not adopted", extra={"skipped": outcome.skipped})
    metrics.add_metric(name="PacksAdopted", unit=MetricUnit.Count, value=len(outcome.adopted))
    return outcome.to_json()


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
