"""What the API client and the presigned transfers share: a keep-alive pool, backoff, request counts."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator

import urllib3

# Statuses worth retrying: throttling and server-side trouble. Everything else 4xx is the caller's fault.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_ATTEMPTS = 6


def new_pool(max_connections: int = 8, read_timeout_s: float = 120.0) -> urllib3.PoolManager:
    """A connection pool that keeps connections alive: one TLS handshake per host, not per request."""
    return urllib3.PoolManager(
        num_pools=8,
        maxsize=max_connections,
        block=True,
        retries=False,  # we retry ourselves: re-signing, counting, and knowing what is idempotent
        timeout=urllib3.Timeout(connect=10.0, read=read_timeout_s),
    )


def backoff_delays(
    attempts: int = DEFAULT_ATTEMPTS, base_s: float = 0.25, cap_s: float = 10.0
) -> Iterator[float]:
    """Delays before each retry (attempts - 1 of them): exponential with full jitter."""
    for attempt in range(attempts - 1):
        yield random.uniform(0, min(cap_s, base_s * 2**attempt))


class RequestCounter:
    """Thread-safe counts of requests by service and route, for `--stats-json` (cost is requests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}

    def add(self, service: str, route: str) -> None:
        with self._lock:
            self._counts.setdefault(service, Counter())[route] += 1

    def total(self, service: str | None = None) -> int:
        with self._lock:
            services = [service] if service else list(self._counts)
            return sum(sum(self._counts.get(name, Counter()).values()) for name in services)

    def as_dict(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {service: dict(sorted(counts.items())) for service, counts in sorted(self._counts.items())}
