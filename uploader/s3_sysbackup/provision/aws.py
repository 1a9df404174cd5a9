"""boto3 sessions for the admin commands, imported lazily with a clear message when boto3 is missing."""

from __future__ import annotations

from typing import Any


class ProvisionError(RuntimeError):
    """A provisioning step failed; the message says which and why."""


def boto3_session(region: str | None = None, profile: str | None = None) -> Any:
    """A boto3 Session in a known region (the admin's profile may supply it); ProvisionError otherwise."""
    try:
        import boto3
    except ImportError:
        raise ProvisionError("this command needs boto3: pip install 's3-sysbackup[provision]'") from None
    session = boto3.Session(region_name=region, profile_name=profile)
    if not session.region_name:
        raise ProvisionError("no AWS region: pass --region or set one in your AWS profile")
    return session
