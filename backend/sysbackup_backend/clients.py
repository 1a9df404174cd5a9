"""boto3 clients, created once per process.

boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL_DYNAMODB itself: the local stack needs no special case.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import boto3
from botocore.config import Config

_RETRIES = {"max_attempts": 8, "mode": "standard"}


@lru_cache(maxsize=1)
def s3_client() -> Any:
    # SigV4 is required for presigned URLs that pin headers (boto3 may otherwise presign with SigV2).
    # Checksums only when required, so a presigned URL carries exactly the checksum header we pin.
    config = Config(
        signature_version="s3v4",
        retries=_RETRIES,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client("s3", config=config)


@lru_cache(maxsize=1)
def dynamodb_client() -> Any:
    """The client behind a DynamoDB resource: it takes and returns plain Python values."""
    return boto3.resource("dynamodb", config=Config(retries=_RETRIES)).meta.client


@lru_cache(maxsize=1)
def sqs_client() -> Any:
    return boto3.client("sqs", config=Config(retries=_RETRIES))


def reset_clients() -> None:
    """Forget cached clients (tests start each mock with fresh ones)."""
    s3_client.cache_clear()
    dynamodb_client.cache_clear()
    sqs_client.cache_clear()
