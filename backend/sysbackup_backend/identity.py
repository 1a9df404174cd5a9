"""Who is calling: the IAM principal API Gateway authenticated, never a field of the request."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, Forbidden

HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_USER_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):user/(?:[^/]+/)*([^/]+)$")
_ASSUMED_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:sts::(\d{12}):assumed-role/([^/]+)/([^/]+)$")
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/(?:[^/]+/)*([^/]+)$")


@dataclass(frozen=True)
class Caller:
    host: str
    arn: str
    is_restore: bool


def is_host_name(value: object) -> bool:
    return isinstance(value, str) and HOST_NAME_RE.fullmatch(value) is not None


def _caller_arn(event: Mapping[str, Any]) -> str:
    try:
        arn = event["requestContext"]["authorizer"]["iam"]["userArn"]
    except (KeyError, TypeError):
        raise Forbidden("the request carries no IAM caller") from None
    if not isinstance(arn, str) or not arn:
        raise Forbidden("the request carries no IAM caller")
    return arn


def _is_restore_principal(arn: str, restore_principal_arns: Collection[str]) -> bool:
    """An exact ARN match, or a session of a listed role (same account and role name)."""
    if arn in restore_principal_arns:
        return True
    assumed = _ASSUMED_ROLE_ARN_RE.fullmatch(arn)
    if assumed is None:
        return False
    account, role_name = assumed.group(1), assumed.group(2)
    for listed in restore_principal_arns:
        role = _ROLE_ARN_RE.fullmatch(listed)
        if role is not None and role.group(1) == account and role.group(2) == role_name:
            return True
    return False


def caller(event: Mapping[str, Any], restore_principal_arns: Collection[str] = ()) -> Caller:
    """The caller from `requestContext.authorizer.iam.userArn`; Forbidden if it names no valid host."""
    arn = _caller_arn(event)
    user = _USER_ARN_RE.fullmatch(arn)
    assumed = _ASSUMED_ROLE_ARN_RE.fullmatch(arn)
    if user is not None:
        name = user.group(2)
    elif assumed is not None:
        # The host role's trust policy pins the session name to the host's user name.
        name = assumed.group(3)
    else:
        raise Forbidden("the caller is neither an IAM user nor an assumed role")
    if not is_host_name(name):
        raise Forbidden(f"the caller's name {name!r} is not a valid host name")
    return Caller(host=name, arn=arn, is_restore=_is_restore_principal(arn, restore_principal_arns))


def caller_host(event: Mapping[str, Any], restore_principal_arns: Collection[str] = ()) -> str:
    return caller(event, restore_principal_arns).host


def target_host(who: Caller, query_host: str | None) -> str:
    """The host a read is about: the caller's own, or `?host=` for restore principals only."""
    if query_host is None or query_host == who.host:
        return who.host
    if not who.is_restore:
        raise Forbidden("only the restore role may read another host's backups")
    if not is_host_name(query_host):
        raise BadRequest(f"host {query_host!r} is not a valid host name")
    return query_host
