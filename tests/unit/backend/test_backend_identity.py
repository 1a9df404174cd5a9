"""Caller identity comes from the IAM principal in the request context, nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from sysbackup_backend.errors import BadRequest, Forbidden
from sysbackup_backend.identity import Caller, caller, caller_host, target_host

ACCOUNT = "123456789012"
RESTORE_ROLE = f"arn:aws:iam::{ACCOUNT}:role/ops/sysbackup-restore"


def event_for(arn: Any) -> dict[str, Any]:
    return {"requestContext": {"authorizer": {"iam": {"userArn": arn}}}, "body": '{"host": "intruder"}'}


@pytest.mark.parametrize(
    ("arn", "host"),
    [
        (f"arn:aws:iam::{ACCOUNT}:user/web01", "web01"),
        (f"arn:aws:iam::{ACCOUNT}:user/sysbackup/hosts/db-2.example", "db-2.example"),
        (f"arn:aws:sts::{ACCOUNT}:assumed-role/sysbackup-host/mail_3", "mail_3"),
        (f"arn:aws-us-gov:iam::{ACCOUNT}:user/gov-host", "gov-host"),
    ],
)
def test_host_is_the_principals_name(arn: str, host: str) -> None:
    assert caller_host(event_for(arn)) == host
    assert not caller(event_for(arn), [RESTORE_ROLE]).is_restore


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"requestContext": {}},
        {"requestContext": {"authorizer": {"jwt": {}}}},
        event_for(""),
        event_for(None),
        event_for(f"arn:aws:iam::{ACCOUNT}:role/some-role"),
        event_for(f"arn:aws:iam::{ACCOUNT}:root"),
        event_for(f"arn:aws:iam::{ACCOUNT}:user/-leading-dash"),
        event_for(f"arn:aws:sts::{ACCOUNT}:assumed-role/r/" + "x" * 64),
        event_for(f"arn:aws:sts::{ACCOUNT}:federated-user/bob"),
    ],
)
def test_anything_else_is_forbidden(event: dict[str, Any]) -> None:
    with pytest.raises(Forbidden):
        caller(event)


def test_sessions_of_the_restore_role_are_restore_principals() -> None:
    arn = f"arn:aws:sts::{ACCOUNT}:assumed-role/sysbackup-restore/operator"
    assert caller(event_for(arn), [RESTORE_ROLE]) == Caller(host="operator", arn=arn, is_restore=True)
    other_account = "arn:aws:sts::999999999999:assumed-role/sysbackup-restore/operator"
    assert not caller(event_for(other_account), [RESTORE_ROLE]).is_restore
    other_role = f"arn:aws:sts::{ACCOUNT}:assumed-role/sysbackup-host/operator"
    assert not caller(event_for(other_role), [RESTORE_ROLE]).is_restore


def test_a_listed_user_arn_is_a_restore_principal() -> None:
    arn = f"arn:aws:iam::{ACCOUNT}:user/auditor"
    assert caller(event_for(arn), [arn]).is_restore


def test_target_host_is_own_unless_restore_principal() -> None:
    host = Caller(host="web01", arn="arn:aws:iam::1:user/web01", is_restore=False)
    restorer = Caller(host="operator", arn="arn", is_restore=True)
    assert target_host(host, None) == "web01"
    assert target_host(host, "web01") == "web01"
    with pytest.raises(Forbidden):
        target_host(host, "db01")
    assert target_host(restorer, "db01") == "db01"
    assert target_host(restorer, None) == "operator"
    with pytest.raises(BadRequest):
        target_host(restorer, "../../etc")
