"""PUT packs to, and GET ranges from, presigned S3 URLs. Hosts hold no S3 rights of their own."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import BinaryIO

import urllib3

from .net import RETRYABLE_STATUSES, RequestCounter, backoff_delays, new_pool

logger = logging.getLogger(__name__)


# A gap between wanted blobs is read and dropped this much at a time.
SKIP_PIECE_BYTES = 1024 * 1024


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

    def open_range(self, url: str, start: int, length: int) -> RangeBody:
        """Bytes [start, start+length) of a presigned GET, read as they arrive (`RangeBody.read_exact`):
        a reader holds what it asked for, not the whole range."""
        if length <= 0:
            return RangeBody(None, f"GET range {start}+0", 0)  # nothing to ask S3 for
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        response = self._request(
            "GET", url, headers=headers, body=None, counter_route="get", preload_content=False
        )
        if response.status not in (200, 206):
            detail = _excerpt(response.read(300))
            response.close()
            response.release_conn()
            raise TransferError(f"GET range {start}+{length}: HTTP {response.status}: {detail}")
        body = RangeBody(response, f"GET range {start}+{length}", length)
        if response.status == 200:  # a server that ignores Range sends the whole object
            body.skip_unread(start)
        return body

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        body: bytes | BinaryIO | None,
        counter_route: str,
        preload_content: bool = True,
    ) -> urllib3.BaseHTTPResponse:
        delays = backoff_delays(self.attempts)
        while True:
            self.counter.add("s3", counter_route)
            if body is not None and not isinstance(body, bytes):
                body.seek(0)  # a spooled pack is sent from its start on every attempt
            try:
                response = self.pool.request(
                    method, url, headers=headers, body=body, preload_content=preload_content
                )
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
                    if not preload_content:  # an unread error body: this connection is not reused
                        response.close()
                        response.release_conn()
                    time.sleep(delay)
                    continue
            return response


class RangeBody:
    """The body of one ranged GET, read in exact pieces; `close` it (a context manager) when done."""

    def __init__(self, response: urllib3.BaseHTTPResponse | None, what: str, length: int) -> None:
        self._response = response
        self._what = what
        self.remaining = length  # bytes of the range not read yet

    def read_exact(self, count: int) -> bytes:
        """The next `count` bytes of the range; TransferError if the connection ends or fails first."""
        if count > self.remaining:
            raise ValueError(f"{self._what}: {count} bytes asked, {self.remaining} left in the range")
        data = self._read(count)
        self.remaining -= count
        return data

    def skip(self, count: int) -> None:
        """Read and drop `count` bytes of the range (a gap between wanted blobs)."""
        while count > 0:
            step = min(count, SKIP_PIECE_BYTES)
            self.read_exact(step)
            count -= step

    def skip_unread(self, count: int) -> None:
        """Drop `count` bytes that come before the range (a server that ignored Range sent them)."""
        while count > 0:
            step = min(count, SKIP_PIECE_BYTES)
            self._read(step)
            count -= step

    def _read(self, count: int) -> bytes:
        if count == 0:
            return b""
        assert self._response is not None  # only an empty range has none
        pieces: list[bytes] = []
        wanted = count
        try:
            while wanted > 0:
                # The object's own bytes (blob offsets count them): no decoding, no re-buffering.
                piece = self._response.read(wanted, decode_content=False)
                if not piece:
                    raise TransferError(f"{self._what}: the body ended {wanted} bytes early")
                pieces.append(piece)
                wanted -= len(piece)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise TransferError(f"{self._what}: {error}") from error
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        # A fully read body leaves the connection reusable; one cut short (or a whole object sent for
        # a range) leaves unread bytes on it: that connection is closed, not reused.
        if self._response is None:
            return
        if self._response.length_remaining != 0:
            self._response.close()
        self._response.release_conn()

    def __enter__(self) -> RangeBody:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _redact(url: str) -> str:
    # Presigned query strings are credentials for a few minutes: keep them out of logs.
    return url.split("?", 1)[0]


def _excerpt(data: bytes) -> str:
    return data[:300].decode(errors="replace")
