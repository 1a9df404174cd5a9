"""The signed client of the backend's HTTP API (v2 routes in docs/PACK_INDEX.md, the rest in ARCHITECTURE.md).

Every request is signed with SigV4 for `execute-api`; the host's IAM principal is its identity, so
nothing in a body names the host. Retries cover throttling, 5xx and dropped connections; a 403 caused
by a wrong host clock is reported as such, because "403 Forbidden" sends people hunting IAM policies.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

from .net import RETRYABLE_STATUSES, RequestCounter, backoff_delays, new_pool
from .sigv4 import CredentialSource, signed_headers

logger = logging.getLogger(__name__)

PRESIGN_BATCH = 100  # POST /packs/presign limit
DOWNLOAD_BATCH = 200  # POST /downloads limit (packs)
PACK_PAGE_LIMIT = 1000  # GET /packs's largest page
# SigV4 allows 15 minutes of skew; beyond a few minutes we call it out even if the server has not yet.
CLOCK_SKEW_LIMIT_S = 300.0
SKEW_MESSAGES = ("signature expired", "requesttimetooskewed", "signature not yet current", "clock")
JOB_POLL_TIMEOUT_S = 900.0
# Read-only batches (download URLs) sent at once: their round trips (and Lambda's concurrency)
# overlap; more would mostly queue behind each other.
PARALLEL_CALLS = 4
LIST_PAGE_LIMIT = 1000  # GET /manifests's largest page: summaries are capped at ~4 KiB each
HEAD_PAGE_LIMIT = 10  # the head is the newest manifest or one of the few committed in its second


class ApiError(RuntimeError):
    """The API answered with an error: `status` and the server's own `message`."""

    def __init__(self, route: str, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{route}: HTTP {status}: {message}")
        self.route = route
        self.status = status
        self.message = message
        self.body = body


class ClockSkewError(ApiError):
    """The request was refused because this host's clock is wrong."""


class ApiUnavailable(RuntimeError):
    """The API could not be reached (or kept failing) after all retries."""


@dataclass(frozen=True)
class PackDownloads:
    """POST /downloads: {pack_id: presigned GET}, {pack_id: size}, {pack_id: why refused}."""

    urls: dict[str, str]
    sizes: dict[str, int]
    missing: dict[str, str]


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: Any


class ApiClient:
    def __init__(
        self,
        endpoint: str,
        region: str,
        credentials: CredentialSource,
        *,
        counter: RequestCounter | None = None,
        pool: urllib3.PoolManager | None = None,
        attempts: int = 6,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.region = region
        self.credentials = credentials
        self.counter = counter or RequestCounter()
        self.pool = pool or new_pool(read_timeout_s=60.0)
        self.attempts = attempts

    # -- the routes -------------------------------------------------------------------------

    def presign_packs(self, packs: Sequence[Mapping[str, Any]]) -> tuple[list[dict], set[str]]:
        """Presigned uploads for `packs` ([{sha256, size}]) and the ids already stored for this host."""
        uploads: list[dict] = []
        stored: set[str] = set()
        for batch in _batches(list(packs), PRESIGN_BATCH):
            body = self.call("POST", "/packs/presign", {"packs": batch}, route="POST /packs/presign").body
            uploads.extend(_field(body, "uploads", list, "POST /packs/presign"))
            stored.update(_field(body, "stored", list, "POST /packs/presign"))
        return uploads, stored

    def list_packs(self, host: str | None = None) -> list[dict]:
        """Every pack the host may use ([{pack_id, size, state}]), page after page."""
        packs: list[dict] = []
        token: str | None = None
        while True:
            query = {**(_host_query(host) or {}), "limit": str(PACK_PAGE_LIMIT)}
            if token:
                query["next"] = token
            body = self.call("GET", "/packs", query=query, route="GET /packs").body
            packs.extend(_field(body, "packs", list, "GET /packs"))
            token = body.get("next")
            if not token:
                return packs

    def download_urls(self, pack_ids: Iterable[str], host: str | None = None) -> PackDownloads:
        """Presigned GETs of whole packs (ranged reads allowed), their sizes, and the refused ones."""

        def ask(batch: list[str]) -> Any:
            return self.call(
                "POST", "/downloads", {"packs": batch}, query=_host_query(host), route="POST /downloads"
            ).body

        downloads = PackDownloads({}, {}, {})
        for body in _each_batch(ask, sorted(set(pack_ids)), DOWNLOAD_BATCH):
            downloads.urls.update(_field(body, "urls", dict, "POST /downloads"))
            downloads.sizes.update(_field(body, "sizes", dict, "POST /downloads"))
            downloads.missing.update(body.get("missing") or {})
        return downloads

    def commit_manifest(self, request: Mapping[str, Any]) -> dict:
        """POST /manifests; a 202 is polled until the job ends. Returns {manifest_id, retain_until}."""
        response = self.call("POST", "/manifests", request, route="POST /manifests")
        if response.status == 202:
            job_id = _field(response.body, "job_id", str, "POST /manifests")
            return self.wait_for_job(job_id)
        return response.body

    def wait_for_job(self, job_id: str, timeout_s: float = JOB_POLL_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        delay = 0.5
        while True:
            # Each poll also moves the backend's commit walk on; a failed job answers with its
            # error status (409, 422), which `call` raises as ApiError.
            job = self.call("GET", f"/jobs/{quote(job_id, safe='')}", route="GET /jobs/{job_id}").body
            state = str(job.get("state", "")).lower()
            if "manifest_id" in job:
                return job
            if state in ("succeeded", "success", "done", "completed", "complete"):
                return job.get("result") or {}
            if state in ("failed", "error"):
                result = job.get("result") or {}
                status = int(result.get("status", 500)) if isinstance(result, dict) else 500
                message = result.get("message", str(result)) if isinstance(result, dict) else str(result)
                raise ApiError("POST /manifests (job)", status, message, result)
            if time.monotonic() > deadline:
                raise ApiUnavailable(f"job {job_id} still {state or 'pending'} after {timeout_s:.0f} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)

    def list_manifests(self, host: str | None = None) -> list[dict]:
        """Every manifest summary of the host, newest first, page after page."""
        summaries: list[dict] = []
        token: str | None = None
        while True:
            page = self.manifest_page(host, LIST_PAGE_LIMIT, token)
            summaries.extend(_field(page, "manifests", list, "GET /manifests"))
            token = page.get("next")
            if not token:
                return summaries

    def latest_manifest(self, host: str | None = None) -> dict | None:
        """The summary of the host's head (None before its first commit); usually one request.

        The head is nearly always the newest id, but two commits in one second sort by their
        random suffix, so the page is searched for the head's id and followed until it is found.
        """
        token: str | None = None
        while True:
            page = self.manifest_page(host, HEAD_PAGE_LIMIT, token)
            head = page.get("head")
            if head is None:
                return None
            for summary in _field(page, "manifests", list, "GET /manifests"):
                if summary.get("manifest_id") == head:
                    return summary
            token = page.get("next")
            if not token:
                raise ApiError("GET /manifests", 200, f"the head {head!r} is not among the listed manifests")

    def manifest_page(self, host: str | None, limit: int, token: str | None = None) -> dict:
        """One page of GET /manifests: {manifests (newest first), next, head}."""
        query = {**(_host_query(host) or {}), "limit": str(limit)}
        if token:
            query["next"] = token
        body = self.call("GET", "/manifests", query=query, route="GET /manifests").body
        if not isinstance(body, dict):
            raise ApiError("GET /manifests", 200, f"unexpected answer {body!r:.200}")
        return body

    def get_manifest(self, manifest_id: str, host: str | None = None) -> dict:
        path = f"/manifests/{quote(manifest_id, safe='')}"
        return self.call("GET", path, query=_host_query(host), route="GET /manifests/{manifest_id}").body

    # -- signing, sending, retrying ---------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        route: str | None = None,
    ) -> ApiResponse:
        """Send one signed request with retries; every route here is safe to repeat."""
        route = route or f"{method} {path}"
        url = self.endpoint + path + (f"?{urlencode(query)}" if query else "")
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        delays = backoff_delays(self.attempts)
        while True:
            self.counter.add("api", route)
            try:
                response = self._send(method, url, data)
            except urllib3.exceptions.HTTPError as error:
                delay = next(delays, None)
                if delay is None:
                    raise ApiUnavailable(f"{route}: {self.endpoint} unreachable: {error}") from error
                logger.info("%s: %s; retrying in %.1f s", route, error, delay)
                time.sleep(delay)
                continue
            if response.status in RETRYABLE_STATUSES:
                delay = next(delays, None)
                if delay is not None:
                    logger.info("%s: HTTP %d; retrying in %.1f s", route, response.status, delay)
                    time.sleep(delay)
                    continue
            return self._interpret(route, response)

    def _send(self, method: str, url: str, data: bytes | None) -> urllib3.BaseHTTPResponse:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        keys = self.credentials.get_frozen_credentials()
        # Signed afresh on every attempt: the signature embeds the time.
        signed = signed_headers(method, url, headers, data, keys, self.region, "execute-api")
        return self.pool.request(method, url, body=data, headers=signed, preload_content=True)

    def _interpret(self, route: str, response: urllib3.BaseHTTPResponse) -> ApiResponse:
        body = _decode_json(response.data)
        if response.status < 400:
            return ApiResponse(response.status, body)
        message = body.get("message") if isinstance(body, dict) else None
        message = str(message or response.data[:500].decode(errors="replace") or response.reason)
        if response.status == 403:
            skew = clock_skew_s(response.headers.get("Date"))
            if _mentions_skew(message) or (skew is not None and abs(skew) > CLOCK_SKEW_LIMIT_S):
                raise ClockSkewError(route, 403, describe_skew(skew, message), body)
        if response.status >= 500 or response.status == 429:
            raise ApiUnavailable(f"{route}: HTTP {response.status} after {self.attempts} attempts: {message}")
        raise ApiError(route, response.status, message, body)


def clock_skew_s(date_header: str | None) -> float | None:
    """Server time minus local time, from an HTTP Date header (None if absent or unparsable)."""
    if not date_header:
        return None
    try:
        server_time = email.utils.parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return None
    if server_time.tzinfo is None:
        server_time = server_time.replace(tzinfo=timezone.utc)
    return (server_time - datetime.now(timezone.utc)).total_seconds()


def describe_skew(skew_s: float | None, server_message: str) -> str:
    if skew_s is None:
        return f"host clock is off (the API refused the signature's time: {server_message}); fix NTP"
    direction = "behind" if skew_s > 0 else "ahead of"
    return (
        f"host clock is off by {abs(skew_s):.0f} s ({direction} the API's clock); SigV4 refuses requests "
        f"more than 15 minutes off: fix NTP (server said: {server_message})"
    )


def _mentions_skew(message: str) -> bool:
    lowered = message.lower()
    return any(phrase in lowered for phrase in SKEW_MESSAGES)


def _decode_json(data: bytes) -> Any:
    if not data:
        return {}
    try:
        return json.loads(data)
    except ValueError:
        return {}


def _field(body: Any, name: str, kind: type, route: str) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get(name), kind):
        raise ApiError(route, 502, f"malformed response: missing {name!r}", body)
    return body[name]


def _host_query(host: str | None) -> dict[str, str] | None:
    return {"host": host} if host else None


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _each_batch(send: Callable[[list], Any], items: list, size: int) -> Iterator[Any]:
    """`send` each batch of `size`, PARALLEL_CALLS at once; answers in batch order; the first error raises."""
    batches = list(_batches(items, size))
    if len(batches) <= 1:
        yield from (send(batch) for batch in batches)
        return
    with ThreadPoolExecutor(max_workers=min(PARALLEL_CALLS, len(batches)), thread_name_prefix="api") as pool:
        yield from pool.map(send, batches)
