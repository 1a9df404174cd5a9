"""A host's AWS credentials file (botocore's shared-credentials format) and the IAM user behind it."""

from __future__ import annotations

import configparser
import contextlib
import re
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from sysbackup_domain.manifest import HOST_NAME_RE, is_host_name

from .aws import ProvisionError

PROFILE = "default"
ACCESS_KEY_ID = re.compile(r"^[A-Z0-9]{16,128}$")

PLACEHOLDER = """\
# The keys this host signs its API calls with (an IAM user in the package's hosts group).
# Fill in, or create them with: s3-sysbackup write-config --create-user HOSTNAME
# or bring them from another machine with: s3-sysbackup import-credentials FILE
[default]
# aws_access_key_id = AKIA...
# aws_secret_access_key = ...
"""


@dataclass(frozen=True)
class AccessKey:
    user_name: str
    access_key_id: str
    secret_access_key: str


def render_credentials(key: AccessKey) -> str:
    return (
        f"# IAM user {key.user_name}: may only call the backup API (written by s3-sysbackup)\n"
        f"[{PROFILE}]\n"
        f"aws_access_key_id = {key.access_key_id}\n"
        f"aws_secret_access_key = {key.secret_access_key}\n"
    )


def parse_credentials(text: str) -> tuple[str, str]:
    """(access key id, secret) of the default profile; ProvisionError if it is not such a file."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
        access_key_id = parser.get(PROFILE, "aws_access_key_id").strip()
        secret = parser.get(PROFILE, "aws_secret_access_key").strip()
    except (configparser.Error, UnicodeDecodeError) as error:
        raise ProvisionError(f"not an AWS credentials file with a [{PROFILE}] key pair: {error}") from None
    if not ACCESS_KEY_ID.match(access_key_id) or not secret:
        raise ProvisionError("the credentials file's access key id or secret is malformed")
    return access_key_id, secret


def validate_host_name(name: str) -> str:
    # docs/ARCHITECTURE.md "Identity": the IAM user name is the host name, so it must be a valid one.
    if not is_host_name(name):
        raise ProvisionError(f"host (IAM user) name {name!r} must match {HOST_NAME_RE.pattern}")
    return name


def create_host_user(iam: Any, name: str, group: str, package: str) -> AccessKey:
    """A new IAM user in the hosts group, with one access key; undone if a step fails.

    The user's path names the package (`/<package>/hosts/`), which tells hosts of different packages
    apart in the console; the backend takes the host name from the last part of the ARN.
    """
    validate_host_name(name)
    try:
        iam.create_user(UserName=name, Path=f"/{package}/hosts/")
    except iam.exceptions.EntityAlreadyExistsException:
        raise ProvisionError(
            f"IAM user {name!r} already exists; a host's identity must be its own (pick another name, "
            "or create a new access key for it in IAM and import it)"
        ) from None
    except (BotoCoreError, ClientError) as error:
        raise ProvisionError(f"cannot create IAM user {name!r}: {error}") from error
    try:
        iam.add_user_to_group(GroupName=group, UserName=name)
        created = iam.create_access_key(UserName=name)["AccessKey"]
    except (BotoCoreError, ClientError) as error:
        _delete_user(iam, name, group)
        raise ProvisionError(f"cannot set up IAM user {name!r} (removed again): {error}") from error
    return AccessKey(name, created["AccessKeyId"], created["SecretAccessKey"])


def delete_host_user(iam: Any, key: AccessKey, group: str) -> None:
    """Undo create_host_user (used when a later step fails, so no unused key is left behind)."""
    with contextlib.suppress(BotoCoreError, ClientError):
        iam.delete_access_key(UserName=key.user_name, AccessKeyId=key.access_key_id)
    _delete_user(iam, key.user_name, group)


def _delete_user(iam: Any, name: str, group: str) -> None:
    for call, kwargs in (
        (iam.remove_user_from_group, {"GroupName": group, "UserName": name}),
        (iam.delete_user, {"UserName": name}),
    ):
        with contextlib.suppress(BotoCoreError, ClientError):
            call(**kwargs)
