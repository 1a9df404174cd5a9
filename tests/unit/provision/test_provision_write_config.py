"""write-config and import-credentials against moto's CloudFormation and IAM.

The written directory is checked with the uploader's own readers (load_config, load_credentials,
runnable_scripts), so "written" means "what archive will actually use".
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import boto3
import pytest
from provision_testkit import API_ENDPOINT, PACKAGE, REGION, DeployedPackage
from s3_sysbackup.cli import main
from s3_sysbackup.commands import write_config as write_config_command
from s3_sysbackup.config import load_config
from s3_sysbackup.credentials import load_credentials
from s3_sysbackup.pickers import runnable_scripts
from s3_sysbackup.provision import files, host_config, sealing

PASSPHRASE = "transfer passphrase 42"


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path / "etc-backup"


@pytest.fixture
def systemd_dir(tmp_path: Path) -> Path:
    return tmp_path / "systemd"


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    return path


def write_config(config_dir: Path, systemd_dir: Path, *extra: str) -> int:
    return main(
        [
            "write-config",
            "--config-dir",
            str(config_dir),
            "--package",
            PACKAGE,
            "--region",
            REGION,
            "--systemd-dir",
            str(systemd_dir),
            "--executable",
            "/usr/bin/s3-sysbackup",
            *extra,
        ]
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def iam_users() -> list[str]:
    return [user["UserName"] for user in boto3.client("iam").list_users()["Users"]]


def test_writes_a_config_the_uploader_loads(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert write_config(config_dir, systemd_dir) == 0

    with caplog.at_level(logging.WARNING, logger="s3_sysbackup"):
        config = load_config(config_dir)
    assert caplog.records == []  # every section and key written is one the uploader knows
    assert config.api.endpoint == API_ENDPOINT
    assert config.api.region == REGION
    assert config.aws.credentials_file == (config_dir / "credentials").resolve()
    conf_text = (config_dir / "conf").read_text()
    assert f"bucket = {deployed_package.bucket}" in conf_text
    assert f"export = {PACKAGE}-BucketName" in conf_text
    assert f"# role_arn = {deployed_package.host_role_arn}" in conf_text
    # No user was made: the credentials file is a private placeholder the uploader refuses clearly.
    assert mode(config_dir / "credentials") == 0o600
    with pytest.raises(RuntimeError, match="has no keys"):
        load_credentials(config.aws, REGION)


def test_only_the_safe_example_picker_runs_until_the_admin_enables_others(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path
) -> None:
    assert write_config(config_dir, systemd_dir) == 0
    runnable = list(runnable_scripts(config_dir / "pickers.d"))
    assert [path.name for path in runnable] == ["10-etc"]
    assert subprocess.run([runnable[0]], capture_output=True, check=True).stdout == b"/etc\n"
    # snapshots.d exists and is empty: nothing dumps, and archive has nothing to warn about.
    assert list((config_dir / "snapshots.d").iterdir()) == []
    # The examples wait aside, ready to copy in; the project's own snapshotters among them.
    examples = sorted(path.name for path in (config_dir / "examples" / "snapshots.d").iterdir())
    shipped = sorted(path.name for path in host_config.PROJECT_SNAPSHOTTERS.glob("*"))
    assert examples == sorted(["packages", *shipped])
    for example in [*(config_dir / "examples").glob("*/*")]:
        assert os.access(example, os.X_OK)
        # Valid for its own interpreter (syntax check only: nothing runs).
        interpreter = example.read_text().splitlines()[0].removeprefix("#!").split()
        assert interpreter[0].endswith(("/sh", "/bash")), interpreter
        subprocess.run([*interpreter, "-n", str(example)], check=True)


def test_the_admins_own_scripts_are_never_replaced(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path
) -> None:
    mine = config_dir / "pickers.d" / "10-etc"
    mine.parent.mkdir(parents=True)
    mine.write_text("#!/bin/sh\necho /etc/nginx\n")
    assert write_config(config_dir, systemd_dir) == 0
    assert mine.read_text() == "#!/bin/sh\necho /etc/nginx\n"


def test_writes_the_systemd_units_for_this_config(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path
) -> None:
    assert write_config(config_dir, systemd_dir) == 0
    service = (systemd_dir / "s3-sysbackup.service").read_text()
    assert f"ExecStart=/usr/bin/s3-sysbackup --config-dir {config_dir} archive --quiet" in service
    assert (systemd_dir / "s3-sysbackup.timer").is_file()


def test_create_user_makes_a_host_user_in_the_hosts_group_with_working_keys(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path
) -> None:
    assert write_config(config_dir, systemd_dir, "--create-user", "web-1") == 0
    iam = boto3.client("iam")
    user = iam.get_user(UserName="web-1")["User"]
    assert user["Path"] == f"/{PACKAGE}/hosts/"
    members = iam.get_group(GroupName=deployed_package.hosts_group)["Users"]
    assert [member["UserName"] for member in members] == ["web-1"]
    (key,) = iam.list_access_keys(UserName="web-1")["AccessKeyMetadata"]

    assert mode(config_dir / "credentials") == 0o600
    credentials = load_credentials(load_config(config_dir).aws, REGION)
    assert credentials.get_frozen_credentials().access_key == key["AccessKeyId"]


@pytest.mark.parametrize("role", ["host", "restore"])
def test_assume_role_writes_the_packages_role_as_the_signing_identity(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path, role: str
) -> None:
    assert write_config(config_dir, systemd_dir, "--assume-role", role) == 0
    expected = {"host": deployed_package.host_role_arn, "restore": deployed_package.restore_role_arn}[role]
    assert load_config(config_dir).aws.role_arn == expected


def test_a_host_user_never_gets_a_restore_config(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert write_config(config_dir, systemd_dir, "--assume-role", "restore", "--create-user", "web-8") == 1
    assert "restore role" in capsys.readouterr().err
    assert iam_users() == [] and not config_dir.exists()


def test_without_assume_role_the_host_role_is_only_suggested(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path
) -> None:
    assert write_config(config_dir, systemd_dir) == 0
    assert load_config(config_dir).aws.role_arn is None


def test_endpoint_and_bucket_given_need_no_cloudformation(
    aws: None, config_dir: Path, systemd_dir: Path
) -> None:
    status = write_config(
        config_dir, systemd_dir, "--api-endpoint", "https://api.example.test/", "--bucket", "my-bucket"
    )
    assert status == 0
    assert load_config(config_dir).api.endpoint == "https://api.example.test"


def test_a_package_that_is_not_deployed_is_named_and_nothing_is_written(
    aws: None, config_dir: Path, systemd_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert write_config(config_dir, systemd_dir) == 1
    assert f"no export '{PACKAGE}-ApiEndpoint'" in capsys.readouterr().err
    assert not config_dir.exists() and not systemd_dir.exists()


def test_an_existing_conf_is_kept_unless_forced_and_no_user_is_made(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_dir.mkdir()
    (config_dir / "conf").write_text("# mine\n")
    (config_dir / "credentials").write_text("[default]\n# my keys\n")
    assert write_config(config_dir, systemd_dir, "--create-user", "web-2") == 1
    assert "already exists" in capsys.readouterr().err
    assert (config_dir / "conf").read_text() == "# mine\n"
    assert iam_users() == []

    assert write_config(config_dir, systemd_dir, "--force") == 0
    assert "[api]" in (config_dir / "conf").read_text()
    assert (config_dir / "credentials").read_text() == "[default]\n# my keys\n"  # keys are never replaced


def test_an_existing_iam_user_is_refused_and_nothing_is_written(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    boto3.client("iam").create_user(UserName="db-1")
    assert write_config(config_dir, systemd_dir, "--create-user", "db-1") == 1
    assert "already exists" in capsys.readouterr().err
    assert not config_dir.exists()


def test_a_bad_host_name_is_refused_before_any_call(
    deployed_package: DeployedPackage, config_dir: Path, systemd_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert write_config(config_dir, systemd_dir, "--create-user", "web/1") == 1
    assert "must match" in capsys.readouterr().err
    assert iam_users() == []


# ---------------------------------------------------------------- encrypted credentials


def test_encrypted_keys_travel_to_another_host_and_import_there(
    deployed_package: DeployedPackage,
    config_dir: Path,
    systemd_dir: Path,
    passphrase_file: Path,
    tmp_path: Path,
) -> None:
    sealed = tmp_path / "web-3.keys"
    status = write_config(
        config_dir,
        systemd_dir,
        "--create-user",
        "web-3",
        "--encrypt-credentials",
        str(sealed),
        "--passphrase-file",
        str(passphrase_file),
    )
    assert status == 0
    assert mode(sealed) == 0o600
    (key,) = boto3.client("iam").list_access_keys(UserName="web-3")["AccessKeyMetadata"]
    assert key["AccessKeyId"].encode() not in sealed.read_bytes()
    # The keys are only in the encrypted file: this machine keeps no plaintext copy.
    assert not (config_dir / "credentials").exists()

    other_host = tmp_path / "other-host"
    status = main(
        [
            "import-credentials",
            str(sealed),
            "--config-dir",
            str(other_host),
            "--passphrase-file",
            str(passphrase_file),
        ]
    )
    assert status == 0
    assert mode(other_host / "credentials") == 0o600
    (other_host / "conf").write_bytes((config_dir / "conf").read_bytes())
    keys = load_credentials(load_config(other_host).aws, REGION).get_frozen_credentials()
    assert keys.access_key == key["AccessKeyId"]


@pytest.fixture(
    params=[
        "aes-gcm",
        pytest.param("ccrypt", marks=pytest.mark.skipif(shutil.which("ccrypt") is None, reason="no ccrypt")),
    ]
)
def sealed_keys(
    request: pytest.FixtureRequest,
    deployed_package: DeployedPackage,
    config_dir: Path,
    systemd_dir: Path,
    passphrase_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """Keys encrypted by write-config in each format (ccrypt is the default only where installed)."""
    monkeypatch.setattr(sealing, "default_format", lambda: request.param)
    sealed = tmp_path / "keys.sealed"
    assert (
        write_config(
            config_dir,
            systemd_dir,
            "--create-user",
            "web-4",
            "--encrypt-credentials",
            str(sealed),
            "--passphrase-file",
            str(passphrase_file),
        )
        == 0
    )
    return sealed


def test_import_with_a_wrong_passphrase_writes_nothing(
    sealed_keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    target = tmp_path / "target"
    assert (
        main(
            [
                "import-credentials",
                str(sealed_keys),
                "--config-dir",
                str(target),
                "--passphrase-file",
                str(wrong),
            ]
        )
        == 1
    )
    assert "wrong passphrase" in capsys.readouterr().err
    assert not (target / "credentials").exists()


@pytest.mark.parametrize("where", [0.5, 0.99])
def test_import_of_a_damaged_file_writes_nothing(
    sealed_keys: Path, passphrase_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: float
) -> None:
    damaged = bytearray(sealed_keys.read_bytes())
    damaged[int(len(damaged) * where)] ^= 0x40
    sealed_keys.write_bytes(bytes(damaged))
    target = tmp_path / "target"
    argv = ["import-credentials", str(sealed_keys), "--config-dir", str(target)]
    assert main([*argv, "--passphrase-file", str(passphrase_file)]) == 1
    error = capsys.readouterr().err
    assert "damaged" in error or "did not decrypt to AWS credentials" in error
    assert not (target / "credentials").exists()


def test_import_keeps_existing_credentials_unless_forced(
    sealed_keys: Path, passphrase_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "credentials").write_text("[default]\n# old\n")
    argv = [
        "import-credentials",
        str(sealed_keys),
        "--config-dir",
        str(target),
        "--passphrase-file",
        str(passphrase_file),
    ]
    assert main(argv) == 1
    assert (target / "credentials").read_text() == "[default]\n# old\n"
    assert main([*argv, "--force"]) == 0
    assert "aws_secret_access_key" in (target / "credentials").read_text()


def test_import_writes_where_the_hosts_conf_expects_the_keys(
    sealed_keys: Path, passphrase_file: Path, tmp_path: Path
) -> None:
    host_dir = tmp_path / "host-etc"
    host_dir.mkdir()
    keys = tmp_path / "secrets" / "backup-keys"
    (host_dir / "conf").write_text(f"[aws]\ncredentials_file = {keys}\n")
    argv = ["import-credentials", str(sealed_keys), "--config-dir", str(host_dir)]
    assert main([*argv, "--passphrase-file", str(passphrase_file)]) == 0
    assert mode(keys) == 0o600
    assert not (host_dir / "credentials").exists()


def test_encrypting_needs_a_new_user(
    deployed_package: DeployedPackage,
    config_dir: Path,
    systemd_dir: Path,
    passphrase_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--encrypt-credentials", str(tmp_path / "x"), "--passphrase-file", str(passphrase_file)]
    assert write_config(config_dir, systemd_dir, *argv) == 1
    assert "--create-user" in capsys.readouterr().err


def test_no_terminal_and_no_passphrase_file_fails_before_the_user_is_made(
    deployed_package: DeployedPackage,
    config_dir: Path,
    systemd_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    argv = ["--create-user", "web-5", "--encrypt-credentials", str(tmp_path / "keys")]
    assert write_config(config_dir, systemd_dir, *argv) == 1
    assert "--passphrase-file" in capsys.readouterr().err
    assert iam_users() == []


def test_a_failure_to_store_the_keys_removes_the_new_user(
    deployed_package: DeployedPackage,
    config_dir: Path,
    systemd_dir: Path,
    passphrase_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def disk_full(path: Path, data: bytes, mode: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write_config_command, "write_atomically", disk_full)
    argv = [
        "--create-user",
        "web-6",
        "--encrypt-credentials",
        str(tmp_path / "keys"),
        "--passphrase-file",
        str(passphrase_file),
    ]
    assert write_config(config_dir, systemd_dir, *argv) == 1
    assert iam_users() == []
    assert boto3.client("iam").get_group(GroupName=deployed_package.hosts_group)["Users"] == []


def test_private_files_are_never_readable_by_others_even_with_a_loose_umask(tmp_path: Path) -> None:
    previous = os.umask(0o000)
    try:
        files.write_atomically(tmp_path / "secret", b"x", 0o600)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "secret") == 0o600
    assert [path.name for path in tmp_path.iterdir()] == ["secret"]  # no temporary left behind
