"""Host credentials: the credentials file of the conf, and the role session name the trust policy pins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from s3_sysbackup.config import AwsSettings
from s3_sysbackup.credentials import CredentialsError, load_credentials, session_name_for


def test_session_name_is_the_iam_user_name():
    assert session_name_for("arn:aws:iam::123456789012:user/s3-sysbackup/hosts/web-1") == "web-1"
    assert session_name_for("arn:aws:iam::123456789012:user/db-2") == "db-2"
    with pytest.raises(CredentialsError, match="IAM user"):
        session_name_for("arn:aws:sts::123456789012:assumed-role/r/session")


def test_credentials_file_and_profile_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDADMINSHELL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "admin")
    credentials_file = tmp_path / "credentials"
    credentials_file.write_text(
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = d\n"
        "[backup]\naws_access_key_id = AKIDBACKUP\naws_secret_access_key = b\n"
    )
    settings = AwsSettings(profile="backup", credentials_file=credentials_file, role_arn=None, region=None)
    assert load_credentials(settings, "us-east-1").get_frozen_credentials().access_key == "AKIDBACKUP"
    unknown = AwsSettings(profile="nope", credentials_file=credentials_file, role_arn=None, region=None)
    with pytest.raises(CredentialsError, match="no keys for profile 'nope'"):
        load_credentials(unknown, "us-east-1")


def test_missing_credentials_file_is_named(tmp_path: Path):
    settings = AwsSettings(profile=None, credentials_file=tmp_path / "absent", role_arn=None, region=None)
    with pytest.raises(CredentialsError, match="absent"):
        load_credentials(settings, "us-east-1")


def test_role_is_assumed_with_the_user_name_as_session_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        iam = boto3.client("iam", region_name="us-east-1")
        iam.create_user(UserName="web-1", Path="/s3-sysbackup/hosts/")
        key = iam.create_access_key(UserName="web-1")["AccessKey"]
        role_arn = iam.create_role(RoleName="backup-host", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        credentials_file = tmp_path / "credentials"
        credentials_file.write_text(
            f"[default]\naws_access_key_id = {key['AccessKeyId']}\n"
            f"aws_secret_access_key = {key['SecretAccessKey']}\n"
        )
        settings = AwsSettings(
            profile=None, credentials_file=credentials_file, role_arn=role_arn, region=None
        )
        assumed = load_credentials(settings, "us-east-1").get_frozen_credentials()
        assert assumed.access_key != key["AccessKeyId"] and assumed.token
        sts = boto3.client(
            "sts", region_name="us-east-1", aws_access_key_id=assumed.access_key,
            aws_secret_access_key=assumed.secret_key, aws_session_token=assumed.token,
        )  # fmt: skip
        assert sts.get_caller_identity()["Arn"].endswith(":assumed-role/backup-host/web-1")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[default]\naws_access_key_id = AKID\n", "lacks aws_secret_access_key"),
        ("[default]\naws_secret_access_key = s\n", "lacks aws_access_key_id"),
        ("[default]\nregion = eu-west-1\n", "no keys for profile 'default'"),
        ("aws_access_key_id = AKID\n", "credentials_file"),  # no section header: not an INI file
    ],
)
def test_a_credentials_file_without_a_whole_key_pair_is_refused_by_name(
    tmp_path: Path, text: str, problem: str
):
    credentials_file = tmp_path / "credentials"
    credentials_file.write_text(text)
    settings = AwsSettings(profile=None, credentials_file=credentials_file, role_arn=None, region=None)
    with pytest.raises(CredentialsError, match=problem):
        load_credentials(settings, "us-east-1")


def test_a_session_token_in_the_file_is_used(tmp_path: Path):
    credentials_file = tmp_path / "credentials"
    credentials_file.write_text(
        "[default]\naws_access_key_id = AKID\naws_secret_access_key = s\naws_session_token = T\n"
    )
    settings = AwsSettings(profile=None, credentials_file=credentials_file, role_arn=None, region=None)
    assert tuple(load_credentials(settings, "us-east-1").get_frozen_credentials()) == ("AKID", "s", "T")


def test_archiving_with_file_keys_does_not_import_botocore() -> None:
    # botocore's import is ~30 MiB of every run's peak RSS (sigv4.py): the host's commands keep it out.
    code = (
        "import sys, s3_sysbackup.cli as cli; cli.build_parser(); "
        "heavy = ('botocore.auth', 'botocore.session', 'boto3'); "
        "print(sorted(name for name in sys.modules if name.startswith(heavy)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
