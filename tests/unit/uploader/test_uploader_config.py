"""conf parsing: defaults, and errors that name the file, section and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_sysbackup.config import DEFAULT_CACHE_DIR, ConfigError, load_config


def write_conf(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "conf").write_text(text)
    return directory


def test_minimal_conf_gets_defaults(tmp_path: Path):
    config = load_config(write_conf(tmp_path, "[api]\nendpoint = https://x.example/\nregion = eu-west-1\n"))
    assert config.api.endpoint == "https://x.example"
    assert config.content.cache_dir == DEFAULT_CACHE_DIR
    assert config.content.days_retained is None
    assert config.pickers_dir == tmp_path / "pickers.d"


def test_full_conf(tmp_path: Path):
    (tmp_path / "creds").write_text("[default]\n")
    config = load_config(
        write_conf(
            tmp_path,
            "[aws]\ncredentials_file = creds\nprofile = host\nrole_arn = arn:aws:iam::1:role/r\n"
            "[api]\nendpoint = http://127.0.0.1:9000\nregion = us-east-1\n"
            "[content]\nlock_timeout = 2.5\ndays_retained = 45\ncache_dir = /tmp/c\n",
        )
    )
    assert config.aws.credentials_file == (tmp_path / "creds").resolve()
    assert config.content.lock_timeout_s == 2.5 and config.content.days_retained == 45
    assert str(config.content.cache_dir) == "/tmp/c"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[api]\nregion = r\n", r"\[api\] endpoint is required"),
        ("[api]\nendpoint = ftp://x\nregion = r\n", r"\[api\] endpoint must be an http"),
        ("[api]\nendpoint = https://x\n", r"\[api\] region is required"),
        (
            "[api]\nendpoint = https://x\nregion = r\n[content]\nlock_timeout = soon\n",
            r"\[content\] lock_timeout",
        ),
        (
            "[api]\nendpoint = https://x\nregion = r\n[content]\ndays_retained = 0\n",
            r"days_retained must be >= 1",
        ),
        (
            "[api]\nendpoint = https://x\nregion = r\n[aws]\nrole_arn = arn:aws:iam::1:role/r\n",
            "credentials_file",
        ),
        ("not ini at all", "not a valid configparser file"),
    ],
)
def test_errors_name_file_section_and_key(tmp_path: Path, text: str, message: str):
    directory = write_conf(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(directory)
    assert str(directory / "conf") in str(raised.value)


def test_missing_conf_says_so(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nowhere")
