"""PUT packs to, and GET ranges from, presigned S3 URLs. Hosts hold no S3 rights of their own."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import BinaryIO

import urllib3

from .net import RETRYABLE_STATUSES, RequestCounter, backoff_delays, new_pool

logger = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """S3 refused or kept failing a presigned request."""


class Transfer:
    def __init__(
        self,
        counter: RequestCounter | None = None,
        pool: urllib3.PoolManager | None = None,
        attempts: int = 6,
    ) -> None:
        self.counter = counter or RequestCounter()
        self.pool = pool or new_pool(max_connections=8, read_timeout_s=300.0)
        self.attempts = attempts

    def put_pack(self, url: str, headers: Mapping[str, str], body: bytes | BinaryIO) -> bool:
        """Upload one pack with exactly the presigned headers. False if it was already there (412).

        The URL pins `If-None-Match: *`, so a retry after a lost response answers 412 instead of
        writing a second locked version: 412 means the pack is stored, which is what we wanted.
        """
        response = self._request("PUT", url, headers=dict(headers), body=body, counter_route="put")
        if response.status == 412:
            return False
        if response.status >= 300:
            raise TransferError(f"PUT pack: HTTP {response.status}: {_excerpt(response.data)}")
        return True

    def get_range(self, url: str, start: int, length: int) -> bytes:
        """Bytes [start, start+length) of the object behind a presigned GET URL."""
        if length <= 0:
            return b""
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        response = self._request("GET", url, headers=headers, body=None, counter_route="get")
        if response.status not in (200, 206):
            raise TransferError(
                f"GET range {start}+{length}: HTTP {response.status}: {_excerpt(response.data)}"
            )
        data = response.data
        if response.status == 200:  # a server that ignores Range sends the whole object
            data = data[start : start + length]
        if len(data) != length:
            raise TransferError(f"GET range {start}+{length}: got {len(data)} bytes")
        return data

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        body: bytes | BinaryIO | None,
        counter_route: str,
    ) -> urllib3.BaseHTTPResponse:
        delays = backoff_delays(self.attempts)
        while True:
            self.counter.add("s3", counter_route)
            if body is not None and not isinstance(body, bytes):
                body.seek(0)  # a spooled pack is sent from its start on every attempt
            try:
                response = self.pool.request(method, url, headers=headers, body=body, preload_content=True)
            except urllib3.exceptions.HTTPError as error:
                delay = next(delays, None)
                if delay is None:
                    raise TransferError(f"{method} {_redact(url)}: {error}") from error
                logger.info("%s: %s; retrying in %.1f s", method, error, delay)
                time.sleep(delay)
                continue
            if response.status in RETRYABLE_STATUSES:
                delay = next(delays, None)
                if delay is not None:
                    time.sleep(delay)
                    continue
            return response


def _redact(url: str) -> str:
    # Presigned query strings are credentials for a few minutes: keep them out of logs.
    return url.split("?", 1)[0]


def _excerpt(data: bytes) -> str:
    return data[:300].decode(errors="replace")
