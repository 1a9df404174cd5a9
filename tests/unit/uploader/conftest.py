"""Fixtures for uploader unit tests: a config directory, an in-memory backend, a scratch "root"."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from s3_sysbackup.archiver import ArchiveOptions, Archiver, ArchiveResult
from s3_sysbackup.config import ApiSettings, AwsSettings, Config, ContentSettings
from uploader_fakes import FakeBackend, FakeTransfer


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "etc-backup"
    (directory / "pickers.d").mkdir(parents=True)
    (directory / "snapshots.d").mkdir()
    return directory


@pytest.fixture
def make_config(tmp_path: Path, config_dir: Path):
    def make(lock_timeout_s: float = 0.5, workers: int = 2, snapshot_timeout_s: float = 10.0) -> Config:
        return Config(
            config_dir=config_dir,
            aws=AwsSettings(profile=None, credentials_file=None, role_arn=None, region=None),
            api=ApiSettings(endpoint="https://fake-api.invalid", region="us-east-1"),
            content=ContentSettings(
                lock_timeout_s=lock_timeout_s,
                days_retained=None,
                cache_dir=tmp_path / "cache",
                picker_timeout_s=10.0,
                snapshot_timeout_s=snapshot_timeout_s,
                workers=workers,
            ),
        )

    return make


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def transfer(backend: FakeBackend) -> FakeTransfer:
    return FakeTransfer(backend, counter=backend.counter)


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    """A directory the archiver treats as `/` (ArchiveOptions.root_path)."""
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def run_archive(make_config, backend: FakeBackend, transfer: FakeTransfer, host_root: Path):
    def run(**options) -> ArchiveResult:
        config = options.pop("config", None) or make_config()
        archive_options = ArchiveOptions(quiet=True, root_path=str(host_root), **options)
        return Archiver(config, backend, transfer, archive_options).run()  # type: ignore[arg-type]

    return run


def pick(config_dir: Path, *paths: str, name: str = "10-files") -> None:
    """A picker printing `paths` (one per line, exactly as given)."""
    lines = "".join(f"printf '%s\\n' '{p}'\n" for p in paths)
    write_script(config_dir / "pickers.d" / name, lines)
