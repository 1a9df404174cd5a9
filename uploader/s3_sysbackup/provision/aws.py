"""boto3 clients for the admin commands, imported lazily with a clear message when boto3 is missing."""

from __future__ import annotations

from typing import Any


class ProvisionError(RuntimeError):
    """A provisioning step failed; the message says which and why."""


def boto3_session(region: str | None = None, profile: str | None = None) -> Any:
    try:
        import boto3
    except ImportError:
        raise ProvisionError("this command needs boto3: pip install 's3-sysbackup[provision]'") from None
    return boto3.Session(region_name=region, profile_name=profile)


def client(service: str, region: str | None = None, profile: str | None = None) -> Any:
    session = boto3_session(region, profile)
    if session.region_name is None:
        raise ProvisionError(f"no AWS region for {service}: pass --region or set one in your AWS profile")
    return session.client(service)
