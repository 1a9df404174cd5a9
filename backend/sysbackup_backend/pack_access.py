"""The pack registry and pack store of this process, for functions that need nothing else (the verifier).

Why apart from `api.services()`: importing the API module (its resolver, the catalogue, the commit walk)
adds ~0.1 s to a cold start, and the verifier's cold start is billed at 1769 MB on every run it serves.
`api.services()` builds its registry and store here too, so there is one way to make them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from pydantic import StringConstraints

from .clients import dynamodb_client, s3_client
from .registry import PackRegistry
from .settings import get_settings
from .store import PackStore

# A blob or pack hash in a request body or a queue message: lowercase hex SHA-256.
BlobHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


@dataclass(frozen=True)
class PackAccess:
    registry: PackRegistry
    store: PackStore


@lru_cache(maxsize=1)
def pack_access() -> PackAccess:
    """Built on first use (settings and clients are read once)."""
    settings = get_settings()
    return PackAccess(
        PackRegistry(settings.blob_index_table, dynamodb_client()),
        PackStore(settings.bucket_name, s3_client()),
    )
