"""AWS credentials for signing API calls, as the seed's `[aws]` section describes.

`credentials_file` + `profile` select static keys; with `role_arn` as well, those keys assume the role
with the session name pinned to the IAM user's name (the role's trust policy requires it: the backend
derives the host name from the session name). Without a credentials file, botocore's normal chain
(env, ~/.aws, instance profile, a profile that itself assumes a role) applies.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import AwsSettings
from .sigv4 import CredentialSource, Keys, StaticCredentials

if TYPE_CHECKING:  # botocore is imported only for a role or the default chain (~30 MiB, see sigv4.py)
    import botocore.session


class CredentialsError(RuntimeError):
    """No usable AWS credentials."""


def load_credentials(settings: AwsSettings, region: str) -> CredentialSource:
    if settings.credentials_file is not None:
        credentials: CredentialSource = _from_credentials_file(settings.credentials_file, settings.profile)
        if settings.role_arn is None:
            return credentials
        session = _botocore_session()
    else:
        session = _botocore_session()
        credentials = _from_default_chain(session, settings.profile)
    if settings.role_arn is None:
        return credentials
    return _assume_role(session, credentials, settings.role_arn, region)


def _botocore_session() -> botocore.session.Session:
    import botocore.session

    return botocore.session.Session()


def _from_default_chain(session: botocore.session.Session, profile: str | None) -> CredentialSource:
    from botocore.exceptions import BotoCoreError

    if profile is not None:
        session.set_config_variable("profile", profile)
    try:
        credentials = session.get_credentials()
    except BotoCoreError as error:
        raise CredentialsError(f"cannot load AWS credentials: {error}") from error
    if credentials is None:
        raise CredentialsError("no AWS credentials found (set [aws] credentials_file/profile in conf)")
    return credentials


def _from_credentials_file(path: Path, profile: str | None) -> StaticCredentials:
    """Keys from exactly this file and profile: never silently from the environment instead.

    (botocore's default chain prefers AWS_ACCESS_KEY_ID in the environment, so an admin's own keys
    in a shell would sign as the admin, not as the host.) The file is the shared-credentials INI format.
    """
    name = profile or "default"
    if not path.is_file():
        raise CredentialsError(f"[aws] credentials_file {path} does not exist")
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError) as error:
        raise CredentialsError(f"[aws] credentials_file {path}: {error}") from error
    if not parser.has_section(name):
        raise CredentialsError(f"[aws] credentials_file {path} has no keys for profile {name!r}")
    section = parser[name]
    access_key, secret_key = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
    if not access_key and not secret_key:
        raise CredentialsError(f"[aws] credentials_file {path} has no keys for profile {name!r}")
    if not access_key or not secret_key:
        missing = "aws_secret_access_key" if access_key else "aws_access_key_id"
        raise CredentialsError(f"[aws] credentials_file {path}: profile {name!r} lacks {missing}")
    token = section.get("aws_session_token") or section.get("aws_security_token")
    return StaticCredentials(Keys(access_key.strip(), secret_key.strip(), token.strip() if token else None))


def session_name_for(caller_arn: str) -> str:
    """`arn:aws:iam::123:user/path/web-1` -> `web-1`: the name the role's trust policy pins."""
    resource = caller_arn.split(":", 5)[-1]
    if not resource.startswith("user/"):
        raise CredentialsError(
            f"role_arn needs IAM user keys in credentials_file; they belong to {caller_arn}"
        )
    return resource.rsplit("/", 1)[-1]


def _assume_role(
    session: botocore.session.Session, source: CredentialSource, role_arn: str, region: str
) -> CredentialSource:
    from botocore.credentials import AssumeRoleCredentialFetcher, Credentials, DeferredRefreshableCredentials
    from botocore.exceptions import BotoCoreError, ClientError

    def create_client(service: str, **kwargs: Any) -> Any:
        return session.create_client(service, region_name=region, **kwargs)

    frozen = source.get_frozen_credentials()
    sts = create_client(
        "sts",
        aws_access_key_id=frozen.access_key,
        aws_secret_access_key=frozen.secret_key,
        aws_session_token=frozen.token,
    )
    try:
        caller_arn = sts.get_caller_identity()["Arn"]
    except (BotoCoreError, ClientError) as error:
        raise CredentialsError(f"cannot identify the IAM user of credentials_file: {error}") from error
    fetcher = AssumeRoleCredentialFetcher(
        client_creator=create_client,
        source_credentials=Credentials(frozen.access_key, frozen.secret_key, frozen.token),
        role_arn=role_arn,
        extra_args={"RoleSessionName": session_name_for(caller_arn)},
    )
    # Refreshed before expiry, so an archive longer than the session's lifetime keeps signing.
    return DeferredRefreshableCredentials(method="assume-role", refresh_using=fetcher.fetch_credentials)
